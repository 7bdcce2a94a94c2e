"""Entry point: `python -m ctm_jax.main --config=configs/<task>.py[:variant] --workdir=DIR`.

Overrides: `--config.lr=3e-4 --config.model.iterations=50 --config.mesh.fsdp=4`.

Multi-host: every process runs the same command. TPU pods and SLURM jobs are
detected and `jax.distributed` set up from their environment; elsewhere pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from ctm_jax import configs
from ctm_jax import hostmem
from ctm_jax import train
from ctm_jax import validation

_DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), configs.DEFAULT)
_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Config file, with an optional :variant.', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory (default: ./runs/<config>_<variant>); rerun to resume.'
)
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0, for multi-process runs.'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed',
    'auto',
    ['auto', 'on', 'off'],
    'auto: initialise jax.distributed when the flags above are given or a multi-host '
    'TPU / SLURM environment is detected; on: always (JAX detects the cluster); off: never.',
)


def _default_workdir() -> str:
  path = config_flags.get_config_filename(flags.FLAGS['config'])
  name, _, variant = os.path.basename(path).partition(':')
  return os.path.join('runs', f'{os.path.splitext(name)[0]}_{variant or "default"}')


class _QuietLibraries(std_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the run log (warnings pass)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def _multi_host_environment() -> str | None:
  """The cluster this process runs in, when it spans several processes."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return 'SLURM'
  if ',' in os.environ.get('TPU_WORKER_HOSTNAMES', ''):
    return 'TPU pod'
  return None


def _initialize_distributed():
  explicit = {
      'coordinator_address': _COORDINATOR.value,
      'num_processes': _NUM_PROCESSES.value,
      'process_id': _PROCESS_ID.value,
  }
  given = {k: v for k, v in explicit.items() if v is not None}
  if _DISTRIBUTED.value == 'off':
    return
  if given:
    missing = sorted(set(explicit) - set(given))
    if missing:
      raise app.UsageError(f'--{missing[0]} is needed with --{next(iter(given))}')
    if not 0 <= explicit['process_id'] < explicit['num_processes']:
      raise app.UsageError(
          f'--process_id={explicit["process_id"]}: must lie in [0, '
          f'--num_processes={explicit["num_processes"]})'
      )
    jax.distributed.initialize(**explicit)
  elif _DISTRIBUTED.value == 'on' or _multi_host_environment():
    jax.distributed.initialize()  # the environment says who the peers are
  else:
    return
  logging.info(
      'jax.distributed: process %d of %d, %d local of %d devices',
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _initialize_distributed()  # before anything touches a device
  logging.info('Host allocator: %s', hostmem.status())
  workdir = _WORKDIR.value
  if workdir is None:
    workdir = _default_workdir()
    logging.info('No --workdir given; using %s', os.path.abspath(workdir))
  try:
    # Again in the trainer; here for a one-line error.
    task, _ = validation.validate(_CONFIG.value)
    task.check_data(_CONFIG.value)
  except ValueError as e:
    print(f'ctm_jax.main: {e}', file=sys.stderr)
    sys.exit(2)  # a usage error: nothing was compiled or written
  train.train_and_evaluate(_CONFIG.value, workdir)


if __name__ == '__main__':
  hostmem.reexec_with_huge_pages()  # large CPU steps ~15% faster; see hostmem.py
  app.run(main)
