"""The CPU demo: the tiny binaural net (3.1 M params; 1.95 M mono) trained on BiAudio-mini.

Run:  python train.py --config=configs/tiny.py --workdir=runs/tiny
      Renders BiAudio-mini (700 clips) and extracts its features when data/biaudio_mini/demo/shards is
      absent, trains 540 steps on 2 CPU cores (6-14 min in all by VM), then prints the share of clearly
      lateral held-out clips whose generated ILD points to the true side: 100 % measured, against
      47 % for the untrained net over 4 noise draws and 50 % for a mono duplicate.
      python sample.py --config=configs/tiny.py   # sample with the seeded (untrained) net, ~20 s
Arg:  comma-separated flags, e.g. --config=configs/tiny.py:mono,scan,remat,bf16
      (mono = MMAudio itself; scan/remat/bf16 = memory and speed; sequential/shared = ViSAudio variants).
Override any field: --config.train.num_steps=100 --config.flow.num_steps=50
"""
import ml_collections

from configs import common


def get_config(arg=None):
  flags = common.parse_flags(arg)
  config = ml_collections.ConfigDict()
  config.preset = 'tiny'
  config.seed = 0
  config.model = common.model('tiny', flags)
  # The two binaural options beyond the paper (model/flow_matching.py) that make the 10-minute demo
  # learn direction: without them 600 steps leave the ears' errors independent and the ILD random
  # (60 % side agreement; 80 % with the loss weight alone).
  config.flow = common.flow(side_loss_weight=10.0, ear_noise_correlation=0.95)
  config.sample = common.sample()
  config.codec = common.codec('tiny_mel')  # latent = normalised log-mel, Griffin-Lim: no weights
  config.encoders = common.encoders('tiny', seeded=True)  # seeded CLIP / Synchformer / PE stand-ins
  config.mesh = common.mesh((-1, 1, 1))
  config.logical_axis_rules = common.axis_rules()

  # BiAudio-mini, built into `dir` first when it holds no shards (visaudio_jax/data/synthetic.py).
  # The scene: one visible source, no off-screen sound, a still camera and a 120-degree view (sources
  # up to 48 degrees off centre), without the humming class (its ILD stays under 1 dB at any angle):
  # the direction is in the picture and clearly in the sound.
  config.data = ml_collections.ConfigDict(dict(
      dir='data/biaudio_mini/demo/shards', train_split='train', eval_split='valid', worker_count=0,
      skip_corrupt=False,
      synthetic=ml_collections.ConfigDict(dict(
          enabled=True, clips_dir='data/biaudio_mini/demo/clips', num_clips=700, seed=0,
          scene=ml_collections.ConfigDict(dict(  # visaudio_jax.data.synthetic.SyntheticConfig fields
              num_objects=(1, 1), offscreen_prob=0.0, fov_deg=120.0, camera_turn_prob=0.0,
              classes=('beeping', 'hissing', 'drumming', 'whistling')))))))

  config.train = ml_collections.ConfigDict(dict(
      global_batch_size=16, num_steps=540, grad_accum_steps=1,
      seed=14159265,
      init_from='',  # '' | MMAudio .pth/.safetensors (made binaural) | a previous run's workdir
      log_every=50,  # device metrics are fetched, checked and written every log_every steps
      step_log=False,  # also write <workdir>/train_log.jsonl: every step's loss and clip ids
      compilation_cache_dir=''))
  config.optim = common.optim.default_optim_config()
  config.optim.update(lr=1e-3, warmup_steps=100, decay_steps=[350], decay_factor=0.3)
  config.ema = common.optim.default_ema_config()
  config.checkpoint = ml_collections.ConfigDict(dict(every=200, keep=3, keep_period=0, async_save=True))

  # Evaluators (visaudio_jax/train/evaluators/<type>.py): validation loss every 200 steps and at the
  # end; after the last step, the demo's check on the clearly lateral test clips (every azimuth point
  # at least 20 degrees off the median plane, on one side), beside the untrained net over 4 noise
  # draws per clip (one draw is a coin flip per clip), the mono duplicate and the reference.
  config.evals = ml_collections.ConfigDict(dict(
      val=dict(type='validation_loss', every=200, final=True, split='valid', batches=4),
      side=dict(type='side_agreement', every=0, final=True, split='test', num_clips=70,
                ema='sigma_rel_0p05', lateral_deg=20.0, lateral_only=True, untrained_draws=4)))
  return config
