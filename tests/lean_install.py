"""The core install (no extras) as a user meets it: parity, digits and mazes
train; a task or tool that needs an extra stops in one line naming the
`pip install` to run, having written nothing.

CI runs this file in a fresh venv holding only `pip install -e .` (.ci/run);
tests/packaging_test.py runs the same checks with the extras' modules hidden.
Usage: python tests/lean_install.py [--hide_extras]
"""

import os
import pathlib
import subprocess
import sys
import tempfile

from ctm_jax import extras

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs'
EXTRA_MODULES = tuple(name for names in extras.MODULES.values() for name in names)

# A config (or command) that needs an extra, and that extra.
REFUSED = (
    (['-m', 'ctm_jax.main', f'--config={CONFIGS}/rl.py:smoke'], 'rl'),
    (['-m', 'ctm_jax.main', f'--config={CONFIGS}/cifar10.py:smoke'], 'tfds'),
    (['-m', 'ctm_jax.main', f'--config={CONFIGS}/qamnist.py:smoke', '--config.dataset=mnist'],
     'tfds'),
)
TRAINS = ('parity.py:smoke', 'digits.py:smoke', 'mazes.py:smoke')


_PROBE = f'''import importlib, sys
for name in {EXTRA_MODULES}:
  try:
    importlib.import_module(name)
  except ImportError:
    continue
  sys.exit(name + ' is importable: not a lean install')
'''


def hidden_extras_env(where: pathlib.Path) -> dict[str, str]:
  """An environment in which each extra's module fails to import, as when not installed."""
  for name in EXTRA_MODULES:
    (where / name).mkdir(parents=True, exist_ok=True)
    (where / name / '__init__.py').write_text(f'raise ImportError("No module named {name!r}")\n')
  return {**os.environ, 'PYTHONPATH': os.pathsep.join([str(where), os.environ.get('PYTHONPATH', '')])}


def run(args, env, cwd):
  return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True,
                        timeout=900, check=False)


def check_refused(args, extra, env, tmp):
  workdir = pathlib.Path(tmp) / f'refused_{extra}'
  result = run([*args, f'--workdir={workdir}'], env, tmp)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, (args, result.returncode, result.stderr[-2000:])
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  error = [line for line in lines if 'pip install' in line]
  assert len(error) == 1 and f'[{extra}]' in error[0], lines[-5:]
  assert not workdir.exists(), f'{args}: wrote {workdir}'
  return error[0]


def check_import_refused(env, tmp):
  """ctm-import (python -m ctm_jax.interop.torch) on a .pt without torch."""
  checkpoint = pathlib.Path(tmp) / 'model.pt'
  checkpoint.write_bytes(b'not read')
  workdir = pathlib.Path(tmp) / 'imported'
  result = run(['-m', 'ctm_jax.interop.torch', f'--checkpoint={checkpoint}', f'--workdir={workdir}'],
               env, tmp)
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert "'torch' extra" in result.stderr and '.[torch]' in result.stderr, result.stderr
  assert not workdir.exists()


def check_hub_refused(env, tmp):
  """ctm-import and from_pretrained's loader on a Hub model without the hub extra."""
  workdir = pathlib.Path(tmp) / 'hub_imported'
  result = run(['-m', 'ctm_jax.interop.torch', '--checkpoint=hf://SakanaAI/ctm-maze-large',
                f'--workdir={workdir}'], env, tmp)
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert "'hub' extra" in result.stderr and '.[hub]' in result.stderr, result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert not workdir.exists()


def check_gcs_refused(env, tmp):
  """A gs:// workdir without the gcs extra: one line, before anything runs."""
  result = run(['-m', 'ctm_jax.main', f'--config={CONFIGS}/parity.py:smoke', '--workdir=gs://bucket/run'],
               env, tmp)
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  error = [line for line in result.stderr.splitlines() if 'pip install' in line]
  assert len(error) == 1 and '.[gcs]' in error[0] and '--workdir=gs://bucket/run' in error[0], result.stderr


def check_trains(config, env, tmp):
  workdir = pathlib.Path(tmp) / config.replace('.py:', '_')
  result = run(['-m', 'ctm_jax.main', f'--config={CONFIGS}/{config}', f'--workdir={workdir}'], env, tmp)
  assert result.returncode == 0, (config, result.stderr[-3000:])
  assert (workdir / 'metrics.jsonl').read_text().count('"train/loss"') > 0, config
  assert any((workdir / 'checkpoints').iterdir()), config


def main(hide_extras: bool, train: bool = True):
  with tempfile.TemporaryDirectory() as tmp:
    env = {**os.environ, 'CTM_JAX_HUGE_PAGES': '0'}
    if hide_extras:
      env = hidden_extras_env(pathlib.Path(tmp) / 'hidden')
    probe = run(['-c', _PROBE], env, tmp)
    assert probe.returncode == 0, probe.stderr[-2000:]
    for args, extra in REFUSED:
      print(f'refused, names the {extra} extra: {check_refused(args, extra, env, tmp)}')
    check_import_refused(env, tmp)
    print('ctm_jax.interop.torch: refused, names the torch extra')
    check_hub_refused(env, tmp)
    print('ctm_jax.interop.torch on hf://: refused, names the hub extra')
    check_gcs_refused(env, tmp)
    print('ctm_jax.main on gs://: refused, names the gcs extra')
    for config in TRAINS if train else ():
      check_trains(config, env, tmp)
      print(f'trained {config} without the extras')


if __name__ == '__main__':
  main(hide_extras='--hide_extras' in sys.argv)
