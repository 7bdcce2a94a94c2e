"""Entry point: `python -m ctm_jax.main --config=configs/parity.py[:variant] --workdir=DIR`.

Overrides: `--config.lr=3e-4 --config.model.iterations=50`.
"""

import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ctm_jax import train

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'parity.py:small'
)
_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Config file, with an optional :variant.', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory (default: ./runs/<config>_<variant>); rerun to resume.'
)


def _default_workdir() -> str:
  path = config_flags.get_config_filename(flags.FLAGS['config'])
  name, _, variant = os.path.basename(path).partition(':')
  return os.path.join('runs', f'{os.path.splitext(name)[0]}_{variant or "default"}')


class _QuietLibraries(std_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the run log (warnings pass)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  workdir = _WORKDIR.value
  if workdir is None:
    workdir = _default_workdir()
    logging.info('No --workdir given; using %s', os.path.abspath(workdir))
  train.train_and_evaluate(_CONFIG.value, workdir)


if __name__ == '__main__':
  app.run(main)
