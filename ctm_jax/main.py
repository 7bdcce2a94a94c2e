"""Entry point: `python -m ctm_jax.main --config=configs/<task>.py[:variant] --workdir=DIR`.

Overrides: `--config.lr=3e-4 --config.model.iterations=50 --config.mesh.fsdp=4`.

Multi-host: every process runs the same command. TPU pods and SLURM jobs are
detected and `jax.distributed` set up from their environment; elsewhere pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
"""

import logging as std_logging
import os
import sys
import threading
import traceback

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from ctm_jax import checkpoint
from ctm_jax import cli
from ctm_jax import configs
from ctm_jax import hostmem
from ctm_jax import train
from ctm_jax import validation
from ctm_jax import writers

# No default here: a default is parsed, overrides included, when the flag is
# defined, where a mistake could only be a traceback. cli.flags_parser supplies it.
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, f'Config file, with an optional :variant (default {configs.DEFAULT}).',
    lock_config=True,
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
  """Keeps orbax's per-save INFO chatter out of the run log (warnings pass), and
  libraries' tracebacks too: the failure they report reaches the user as the
  trainer's one-line error; the log keeps the library's own one-line message."""

  def __init__(self):
    super().__init__()
    self._seen = set()

  def filter(self, record):
    if '/ctm_jax/' in record.pathname:
      return True
    record.exc_info, record.exc_text = None, None
    if record.levelno >= std_logging.WARNING:
      # One failure shows up in many futures and callbacks: once per call site.
      site = (record.pathname, record.lineno)
      seen = site in self._seen
      self._seen.add(site)
      return not seen
    return '/orbax/' not in record.pathname


def _summary(exc_type, exc_value) -> str:
  return f'{getattr(exc_type, "__name__", "?")}: {validation.first_line(exc_value)}'


def _log_callback_failure(exc_type, exc_value, tb):
  """sys.excepthook: an error raised only through library frames (TensorStore
  printing a failed asyncio callback after a failed save, say) as one log line;
  anything that passed through ctm_jax keeps its traceback."""
  frames = traceback.extract_tb(tb)
  if not frames or any('/ctm_jax/' in frame.filename for frame in frames):
    sys.__excepthook__(exc_type, exc_value, tb)
    return
  logging.warning('Background callback failed: %s', _summary(exc_type, exc_value))


_UNRAISABLE_SEEN = set()


def _log_unraisable(args):
  """sys.unraisablehook: an exception a library could not raise (TensorStore's
  callbacks into a closed event loop after a failed save) as one log line, once."""
  summary = _summary(args.exc_type, args.exc_value)
  if summary in _UNRAISABLE_SEEN:
    return
  _UNRAISABLE_SEEN.add(summary)
  logging.warning('Ignored in a library callback: %s', summary)


def _log_thread_failure(args):
  """A background thread's uncaught exception, as one log line (not a traceback)."""
  if args.exc_type is SystemExit:
    return
  logging.warning(
      'Background thread %s failed: %s',
      getattr(args.thread, 'name', '?'),
      _summary(args.exc_type, args.exc_value),
  )


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
  threading.excepthook = _log_thread_failure
  sys.excepthook = _log_callback_failure
  sys.unraisablehook = _log_unraisable
  _initialize_distributed()  # before anything touches a device
  logging.info('Host allocator: %s', hostmem.status())
  workdir = _WORKDIR.value
  if workdir is None:
    workdir = _default_workdir()
    logging.info('No --workdir given; using %s', os.path.abspath(workdir))
  try:
    # Again in the trainer; here for a one-line error.
    task = validation.validate(_CONFIG.value)
    task.check_data(_CONFIG.value)
  except ValueError as e:
    print(f'ctm_jax.main: {e}', file=sys.stderr)
    sys.exit(2)  # a usage error: nothing was compiled or written
  try:
    train.train_and_evaluate(_CONFIG.value, workdir)
  except validation.UsageError as e:  # a workdir refused: it is left as it was
    print(f'ctm_jax.main: {e}', file=sys.stderr)
    sys.exit(2)
  except (checkpoint.SaveError, writers.WriteError, train.NonFiniteError) as e:
    # The trainer has closed what it could. Exit now: I/O threads left behind by
    # a failed save may block a normal exit or print after the message.
    print(f'ctm_jax.main: {e}', file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access


def run():
  """`ctm-train`, the same as `python -m ctm_jax.main`."""
  hostmem.reexec_with_huge_pages()  # large CPU steps ~15% faster; see hostmem.py
  app.run(main, flags_parser=cli.flags_parser('ctm_jax.main', _CONFIG, cli.DEFAULT_CONFIG))


if __name__ == '__main__':
  run()
