"""The outputs of an evaluation: metrics.json, a readable report.md and PNG plots.

report.md has one table per metric group with every metric beside the four baselines and which of
them beat the generated set, a warning for each spatial metric the mono duplicate wins, the notes,
the mismatched files and the plots. The plots (with the clips at hand) are log-mel spectrograms and
ILD/ITD tracks of a few clips and histograms of every per-clip metric. Every file is written atomically.
"""
from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from visaudio_jax import files
from visaudio_jax.audio import mel as mel_lib
from visaudio_jax.eval import spatial as sp
from visaudio_jax.eval.metrics import SYSTEMS, is_better, metric_info
from visaudio_jax.eval.pairing import Pairs
from visaudio_jax.eval.quality import resample

__all__ = ['write_outputs']

_GROUPS = (('paired', 'Paired spatial metrics (mean over clips)'),
           ('balance', 'Stereo balance (BiasSkill, over the set)'),
           ('distribution', 'Distributional spatial metrics (set vs set)'),
           ('direction', 'Direction accuracy (true source azimuth)'),
           ('quality', 'Quality metrics per ear (embedding networks)'),
           ('fairplay', 'FAIR-Play distances (waveform fidelity, mono-to-binaural literature)'))
_BASELINE_DOC = {
    'reference': 'the reference against itself: the perfect score',
    'swapped': 'reference with left and right exchanged: every cue on the wrong side',
    'mono': 'downmix (L+R)/2 on both ears: no interaural cue (a spatial metric it wins is broken)',
    'random': "another clip's reference (seeded derangement): right kind of audio, wrong scene",
}


def _set_level(name: str) -> bool:
  return metric_info(name).group == 'distribution' or name.startswith('fd_')


def _fmt(v) -> str:
  if v is None:
    return '–'
  if isinstance(v, int):
    return str(v)
  return f'{v:.4g}'


def _beaten_by(name: str, values: dict) -> list[str]:
  """Baselines scoring better than the generated set (random skipped for set-level metrics)."""
  out = []
  for b in ('swapped', 'mono', 'random'):
    if b == 'random' and _set_level(name):
      continue
    if is_better(name, values.get(b), values.get('generated')):
      out.append(b)
  return out


def _safe(name: str) -> str:
  return re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:80]




def _plots(metrics: dict, pairs: Pairs, out_dir: Path, cfg: sp.SpatialConfig, plot_clips: int) -> list[str]:
  """Spectrograms and ILD/ITD tracks of a few clips, per-clip metric histograms -> paths relative to out_dir."""
  # Imported here: matplotlib is heavy and only plots need it. Object API: no pyplot state, Agg canvas.
  from matplotlib.figure import Figure
  plot_dir = out_dir / 'plots'
  plot_dir.mkdir(parents=True, exist_ok=True)
  written = []

  def save(fig, name: str) -> None:
    path = plot_dir / name
    with files.atomic_path(path) as tmp:
      fig.savefig(tmp, format='png', dpi=90)
    written.append(path.relative_to(out_dir).as_posix())

  k = len(pairs.ids)
  chosen = sorted(set(np.linspace(0, k - 1, min(plot_clips, k)).round().astype(int).tolist())) if plot_clips > 0 else []
  if chosen:
    gen = resample(pairs.generated[chosen], pairs.sample_rate, cfg.sample_rate)
    ref = resample(pairs.reference[chosen], pairs.sample_rate, cfg.sample_rate)
    feats = {name: jax.tree.map(np.asarray, sp.jitted_frame_features(cfg, jnp.asarray(x))) for name, x in
             (('generated', gen), ('reference', ref))}
    mel_cfg = mel_lib.MelConfig(sample_rate=cfg.sample_rate, n_fft=1024, hop_length=256, n_mels=80,
                                fmax=cfg.sample_rate / 2, log='log10')
    spec = {name: 20.0 * np.asarray(mel_lib.mel_spectrogram(mel_cfg, jnp.asarray(x))) for name, x in
            (('generated', gen), ('reference', ref))}  # (n, 2, T, M) dB
    seconds = gen.shape[-1] / cfg.sample_rate
    times = (np.arange(feats['reference']['ild'].shape[-1]) * cfg.hop_length + cfg.frame_length / 2) / cfg.sample_rate
    for j, i in enumerate(chosen):
      clip_id = pairs.ids[i]
      top = max(spec['generated'][j].max(), spec['reference'][j].max())
      fig = Figure(figsize=(11, 6))  # fixed margins: constrained layout costs more than the drawing
      fig.subplots_adjust(left=0.06, right=0.9, bottom=0.09, top=0.9, wspace=0.08, hspace=0.25)
      axes = fig.subplots(2, 2, sharex=True, sharey=True)
      for row, name in enumerate(('generated', 'reference')):
        for ear, ear_name in enumerate(('left', 'right')):
          ax = axes[row, ear]
          image = ax.imshow(spec[name][j, ear].T, origin='lower', aspect='auto', extent=(0, seconds, 0, mel_cfg.n_mels),
                            vmin=top - 80, vmax=top, cmap='magma')
          ax.set_title(f'{name}, {ear_name} ear')
          ax.set_ylabel('mel bin')
      for ax in axes[1]:
        ax.set_xlabel('time (s)')
      fig.colorbar(image, cax=fig.add_axes((0.92, 0.09, 0.015, 0.81)), label='dB')
      fig.suptitle(f'{clip_id}: log-mel spectrograms')
      save(fig, f'spectrogram_{j:02d}_{_safe(clip_id)}.png')

      fig = Figure(figsize=(11, 6))
      fig.subplots_adjust(left=0.08, right=0.97, bottom=0.09, top=0.92, hspace=0.12)
      axes = fig.subplots(2, 1, sharex=True)
      for ax, cue, unit, mask in ((axes[0], 'ild', 'dB', 'active'), (axes[1], 'itd', 'ms', 'itd_valid')):
        for name, style in (('reference', dict(color='black', lw=1.5)), ('generated', dict(color='tab:red', lw=1.0))):
          f = feats[name]
          ax.plot(times, np.where(f[mask][j], f[cue][j], np.nan), label=name, **style)
        ax.axhline(0.0, color='grey', lw=0.5)
        ax.set_ylabel(f'{cue.upper()} ({unit}, + = left)')
        ax.legend(loc='upper right')
      axes[1].set_xlabel('time (s)')
      fig.suptitle(f'{clip_id}: interaural cues over time (gated frames)')
      save(fig, f'cues_{j:02d}_{_safe(clip_id)}.png')

  names = [n for n in metrics['per_clip'] if any(v is not None for v in metrics['per_clip'][n]['generated'])]
  if names:
    cols = 4
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4 * cols, 3 * rows))
    fig.subplots_adjust(left=0.04, right=0.98, bottom=0.3 / rows, top=1 - 0.35 / rows, wspace=0.25,
                        hspace=0.45)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, name in zip(axes, names):
      values = {s: np.array([v for v in metrics['per_clip'][name][s] if v is not None]) for s in ('generated', 'mono',
                                                                                                   'random')}
      both = np.concatenate([v for v in values.values() if v.size])
      bins = np.histogram_bin_edges(both, bins=20) if np.ptp(both) > 0 else 10
      ax.hist(values['generated'], bins=bins, color='tab:red', alpha=0.7, label='generated')
      for s, color in (('mono', 'tab:blue'), ('random', 'tab:green')):
        if values[s].size:
          ax.hist(values[s], bins=bins, histtype='step', color=color, lw=1.5, label=s)
      better = metric_info(name).better
      ax.set_title(name + {'lower': ' (lower better)', 'higher': ' (higher better)'}.get(better, ''), fontsize=9)
    for ax in axes[len(names):]:
      ax.axis('off')
    axes[0].legend(fontsize=8)
    fig.suptitle(f'per-clip metrics over {k} clips: generated vs mono and random baselines')
    save(fig, 'per_clip_distributions.png')
  return written


def _report(metrics: dict) -> str:
  src = metrics.get('source', {})
  lines = ['# Binaural evaluation', '']
  if src:
    split = f", split `{src['reference_split']}`" if src.get('reference_split') else ''
    lines += [f"- generated: `{src['generated']}` ({src['generated_files']} files)",
              f"- reference: `{src['reference']}` ({src['reference_kind']}{split}, {src['reference_clips']} clips)"]
  lines += [f"- matched and evaluated: **{metrics['num_clips']} clips** of {metrics['clip_seconds']:.3f} s at "
            f"{metrics['sample_rate']} Hz (spatial metrics at {metrics['analysis_sample_rate']} Hz)",
            '- embedders: ' + ', '.join(f"`{e['name']}` ({e['description']})" for e in metrics['embedders']),
            '', 'Every metric is reported beside four sanity baselines scored against the same references:', '']
  lines += [f'- **{b}**: {doc}' for b, doc in _BASELINE_DOC.items()]
  lines += ['', '↓ lower is better, ↑ higher is better. "beaten by" lists baselines that score better than the '
            'generated set (random is not compared on set-level metrics, which cannot see pairing).', '']
  metric_rows = collections.defaultdict(list)
  for name in metrics['metrics']:
    metric_rows[metric_info(name).group].append(name)
  for group, title in _GROUPS:
    if not metric_rows.get(group):
      continue
    lines += [f'## {title}', '', '| metric | | unit | ' + ' | '.join(SYSTEMS) + ' | beaten by |',
              '|---|---|---|' + '---:|' * len(SYSTEMS) + '---|']
    for name in metric_rows[group]:
      values = metrics['metrics'][name]
      info = metric_info(name)
      arrow = {'lower': '↓', 'higher': '↑'}.get(info.better, '')
      cells = ' | '.join(_fmt(values.get(s)) for s in SYSTEMS)
      lines.append(f'| `{name}` | {arrow} | {info.unit} | {cells} | {", ".join(_beaten_by(name, values))} |')
    if group == 'fairplay':
      lines += ['', 'These compare waveforms sample by sample: meaningful for mono-to-binaural upmixing, not for a '
                'generative model whose content differs from the reference (there the downmix often wins).']
    if group == 'quality':
      lines += ['', 'FD is set-level (random pairing = reference = 0); KL is paired. `mel_stats` is a weight-free '
                'stand-in, not a perceptual embedding: its numbers are not comparable with published FD/KL.']
    lines.append('')
  spatial = [n for n in metrics['mono_beats_generated'] if metric_info(n).group != 'fairplay']
  lines += ['## Warnings', '']
  if spatial:
    lines.append('The mono duplicate scores better than the generated set on: ' + ', '.join(f'`{n}`' for n in spatial)
                 + '. On these the generated audio carries less correct spatial information than no cue at all.')
  else:
    lines.append('None: the generated set beats the mono duplicate on every spatial metric.')
  if metrics.get('notes'):
    lines += ['', '## Notes', ''] + [f'- {note}' for note in metrics['notes']]
  lines += ['', '## Mismatched files', '']
  mismatches = metrics.get('mismatches', {})
  if not mismatches:
    lines.append('None: every reference clip had a generated file of the same length, rate and channel count.')
  else:
    lines += ['| kind | count | examples |', '|---|---:|---|']
    for kind, items in mismatches.items():
      if isinstance(items, dict):  # set_cropped
        lines.append(f"| {kind} | {len(items['ids'])} | cropped to {items['to_seconds']:.3f} s: "
                     f"{', '.join(items['ids'][:5])} |")
        continue
      examples = [json.dumps(x, ensure_ascii=False) if isinstance(x, dict) else str(x) for x in items[:5]]
      more = f' (+{len(items) - 5} more, see metrics.json)' if len(items) > 5 else ''
      lines.append(f"| {kind} | {len(items)} | {'; '.join(examples).replace('|', '/')}{more} |")
  if metrics.get('plots'):
    lines += ['', '## Plots', '']
    lines += [f'![{Path(p).stem}]({p})' for p in metrics['plots']]
  lines += ['', '## Config', '', '```json',
            json.dumps({'spatial': metrics['config'], 'seed': metrics['seed']}, indent=1), '```', '']
  return '\n'.join(lines)


def write_outputs(metrics: dict, out_dir: str | os.PathLike, pairs: Pairs | None = None,
                  config: sp.SpatialConfig | None = None, plot_clips: int = 3) -> dict:
  """Writes plots (when `pairs` is given), report.md and metrics.json (each atomically) to `out_dir`;
  returns `metrics` with 'plots' added."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  metrics = dict(metrics, plots=_plots(metrics, pairs, out_dir, config or sp.SPATIAL_16K, plot_clips) if pairs else [])
  files.write_bytes(out_dir / 'report.md', _report(metrics).encode(), durable=True)
  files.write_bytes(out_dir / 'metrics.json',
                    json.dumps(metrics, indent=1, ensure_ascii=False, allow_nan=False).encode(), durable=True)
  return metrics

