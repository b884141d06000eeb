"""The package's layers only point down (DESIGN.md), as the import-linter contract in pyproject.toml
declares: model < audio, encoders < convert < components < data < sample, eval < train < tools."""
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]
LINT = [sys.executable, '-c', 'import sys; from importlinter.cli import lint_imports_command; '
        'sys.exit(lint_imports_command())']


def _lint(cwd: pathlib.Path) -> subprocess.CompletedProcess:
  return subprocess.run(LINT, cwd=cwd, env={'PYTHONPATH': str(cwd), 'PATH': '/usr/bin:/bin'},
                        capture_output=True, text=True, timeout=300)


def test_the_layering_contract_holds():
  result = _lint(ROOT)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert '1 kept, 0 broken' in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
  """The contract can fail: a copy of the package where the model layer imports the trainer."""
  shutil.copytree(ROOT / 'visaudio_jax', tmp_path / 'visaudio_jax', ignore=shutil.ignore_patterns('__pycache__', '*.safetensors', '*.gz'))
  shutil.copy(ROOT / 'pyproject.toml', tmp_path / 'pyproject.toml')
  layers = tmp_path / 'visaudio_jax' / 'model' / 'layers.py'
  layers.write_text(layers.read_text() + '\nfrom visaudio_jax.train import trainer  # noqa: E402,F401\n')
  result = _lint(tmp_path)
  assert result.returncode != 0
  assert 'visaudio_jax.model.layers -> visaudio_jax.train.trainer' in result.stdout, result.stdout[-3000:]
