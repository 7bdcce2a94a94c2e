"""Whole-config validation, before anything is compiled or written."""

import dataclasses
import json
import numbers
import sys

import jax
import numpy as np

from ctm_jax import manifest
from ctm_jax import sharding
from ctm_jax import storage
from ctm_jax.interop import hub
from ctm_jax.models import ctm as ctm_lib
from ctm_jax import tasks as tasks_lib

_POSITIVE_INTS = (
    'batch_size',
    'batch_size_test',
    'n_test_batches',
    'training_iterations',
    'save_every',
    'track_every',
    'log_every',
    'keep_checkpoints',
)
# Keys a config may leave out, as runs written before they existed do:
# `model_type` (the reference's --model / --model_type: 'ctm', or a baseline
# the task offers) is 'ctm' when absent; `evals` (the evaluators, for a task
# that offers a choice: tasks.Evaluated) is 'default'; `profile_steps` (a
# jax.profiler trace of steps A..B, 'A,B') is '' (none).
OPTIONAL_KEYS = frozenset({'model_type', 'evals', 'profile_steps'})
_NON_NEGATIVE_INTS = (
    'warmup_steps',
    'num_workers_train',
    'num_read_threads',
    'seed',
)


# Trainer keys every task config carries; a task adds its own (`Task.config_keys`).
TRAIN_KEYS = frozenset(
    {
        'task',
        'model',
        'seed',
        'batch_size',
        'batch_size_test',
        'n_test_batches',
        'lr',
        'training_iterations',
        'warmup_steps',
        'use_scheduler',
        'scheduler_type',
        'milestones',
        'gamma',
        'weight_decay',
        'weight_decay_exclude',
        'gradient_clipping',
        'gradient_clipping_type',
        'use_most_certain',
        'save_every',
        'track_every',
        'log_every',
        'keep_checkpoints',
        'num_workers_train',
        'num_read_threads',
        'init_from',
        'init_from_parts',
        'mesh',
    }
)


class UsageError(ValueError):
  """A mistake the user can fix (a field, a path, a workdir): shown as one line, exit 2."""


def supervised_only(task, workdir: str) -> None:
  """UsageError for a run of a task without held-out inputs (RL: it plays
  environments): the tools that read held-out data or single inputs refuse
  it in one line."""
  if not isinstance(task, tasks_lib.Supervised):
    raise UsageError(
        f'--workdir={workdir}: a {task.name!r} run, which has no held-out inputs to read; '
        'it evaluates while it trains (eval/* in metrics.jsonl, plots/)'
    )


# Bytes a float32 parameter costs in training: itself, its gradient and Adam's two moments.
_TRAIN_BYTES_PER_PARAM_BYTE = 4


def host_memory_bytes() -> int | None:
  """MemAvailable of this host (None where /proc/meminfo is missing)."""
  try:
    with open('/proc/meminfo') as f:
      fields = dict(line.split(':', 1) for line in f)
    return int(fields['MemAvailable'].split()[0]) * 1024
  except (OSError, KeyError, ValueError):
    return None


def _saved_activation_bytes(config, model, task, batch_size: int) -> int:
  """Bytes the train step keeps from forward to backward (the residuals of
  its VJP: the model's remat and custom VJPs counted) for `batch_size`
  examples; shapes only (jax.eval_shape). Measured at 85-99% of XLA's
  temporaries (the rest are transients) on parity, CIFAR-10 and mazes."""
  spec = task.record_spec(config)
  batch = {name: jax.ShapeDtypeStruct((batch_size, *shape), dtype) for name, (shape, dtype) in spec.items()}

  def residuals(batch):
    inputs = task.model_inputs(batch)
    variables = model.init(jax.random.key(0), inputs)

    def loss(params):
      output, _ = model.apply({**variables, 'params': params}, inputs, train=True,
                              rngs={'dropout': jax.random.key(1)}, mutable=['batch_stats'])
      return task.loss(config, output, batch)[0]

    return jax.vjp(loss, variables['params'])[1]  # a pytree whose leaves are the residuals

  return _bytes(jax.eval_shape(residuals, batch))


def _bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def check_memory(config, model, task) -> None:
  """UsageError, before anything is allocated, when a train step cannot fit:
  the train state (parameters, gradients, Adam's moments) and the activations
  the backward pass reads, per device against an accelerator's memory, or for
  all local devices against the host's available memory. Shapes only
  (jax.eval_shape); python -m ctm_jax.tools.compile_check measures the
  compiled step."""
  if not isinstance(task, tasks_lib.Supervised):  # RL: its environments make the inputs
    return
  inputs = task.model_inputs(task.example_batch(config))
  param_bytes = _bytes(jax.eval_shape(lambda: model.init(jax.random.key(0), inputs)))
  mesh = config.get('mesh', {})
  shards = max(1, int(mesh.get('fsdp', 1) or 1) * int(mesh.get('neuron', 1) or 1))
  devices = jax.local_devices()
  stats = devices[0].memory_stats() or {}
  if stats.get('bytes_limit'):
    count, limit, where = 1, int(stats['bytes_limit']), f'one {devices[0].device_kind} has'
  else:
    count, limit, where = len(devices), host_memory_bytes(), 'this host has available'
  state = _TRAIN_BYTES_PER_PARAM_BYTE * param_bytes / shards * count
  if limit and state > limit:  # before tracing the step, which a model this size makes slow
    raise UsageError(
        f'config.model: the train state needs ~{state / 2**30:.1f} GiB ({param_bytes / 4 / 1e6:.0f}M '
        f'float32 parameters with their gradients and optimiser moments), over the '
        f'{limit / 2**30:.1f} GiB {where}; make the model smaller (config.model.d_model, '
        'd_input, synapse_depth) or shard it (config.mesh.fsdp, config.mesh.neuron)'
    )
  if not limit:
    return
  # Every mesh axis splits the activations: the batch over data and fsdp, neurons over neuron.
  activations = _saved_activation_bytes(config, model, task, config.batch_size) / jax.device_count() * count
  if state + activations > limit:
    raise UsageError(
        f'config.batch_size={config.batch_size}: a train step needs ~{(state + activations) / 2**30:.1f} GiB '
        f'({state / 2**30:.1f} GiB train state, {activations / 2**30:.1f} GiB activations kept for the '
        f'backward pass), over the {limit / 2**30:.1f} GiB {where}; lower config.batch_size, '
        "set config.model.remat='sqrt' (or 'full'), or make the model smaller (config.model.iterations, "
        'd_model)'
    )


def first_line(error: BaseException) -> str:
  """The first line of an exception's message ('' when it has none): one-line errors."""
  lines = str(error).strip().splitlines()
  return lines[0] if lines else ''


def command(prog: str, body):
  """An absl `main` for a command: `body(flags.FLAGS)` with absl's and orbax's
  info lines off; a mistake the user can fix (UsageError, ValueError, OSError)
  is one line `<prog>: ...` on stderr and exit code 2, never a traceback."""

  def main(argv):
    from absl import app  # pylint: disable=g-import-not-at-top
    from absl import flags  # pylint: disable=g-import-not-at-top
    from absl import logging  # pylint: disable=g-import-not-at-top

    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    logging.set_verbosity(logging.WARNING)
    try:
      body(flags.FLAGS)
    except (UsageError, ValueError, OSError) as e:
      print(f'{prog}: {first_line(e)}', file=sys.stderr)
      sys.exit(2)

  return main


def profile_range(config) -> tuple[int, int] | None:
  """(A, B) of config.profile_steps='A,B' (trace steps A..B), None when empty."""
  text = config.get('profile_steps') or ''
  if not text:
    return None
  parts = str(text).split(',')
  try:
    first, last = (int(p) for p in parts)
  except ValueError:
    first = last = 0
  if len(parts) != 2 or not 1 <= first <= last:
    _fail('profile_steps', text, "expected 'A,B', the first and last step to trace, 1 <= A <= B")
  return first, last


def _fail(field, value, why):
  raise ValueError(f'config.{field}={value!r}: {why}')


def _is_int(value):
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate(config, num_devices: int | None = None):
  """Raises ValueError naming the first bad field; returns the config's task.

  Checks only: the model is built by `task.make_model(config)`, the one
  place models are made (here too, for the checks its constructor makes).
  The mesh is checked against `num_devices` (default: every device of every process).
  """
  if 'task' not in config:
    _fail('task', None, 'missing; expected one of ' + ', '.join(tasks_lib.names()))
  task = tasks_lib.get(config.task)
  known = (TRAIN_KEYS if task.trainer_keys is None else task.trainer_keys) | task.config_keys
  for key in config:
    if key not in known | OPTIONAL_KEYS:
      _fail(key, config[key], f'unknown key for task {config.task!r}')
  for key in sorted(known - set(config)):
    _fail(key, None, 'missing')
  model_type = config.get('model_type', 'ctm')
  if model_type not in task.model_types():
    _fail('model_type', model_type, f'task {config.task!r} trains {", ".join(map(repr, task.model_types()))}')
  if 'evals' in config:
    if not isinstance(task, tasks_lib.Evaluated):
      _fail('evals', config.evals, f'task {config.task!r} offers no choice of evaluators')
    task.eval_names(config)
  if config.get('profile_steps'):
    profile_range(config)
  task.validate(config)
  for field in (f for f in _POSITIVE_INTS if f in known):
    value = config.get(field)
    if not _is_int(value) or value < 1:
      _fail(field, value, 'must be a positive integer')
  for field in (f for f in _NON_NEGATIVE_INTS if f in known):
    value = config.get(field)
    if not _is_int(value) or value < 0:
      _fail(field, value, 'must be a non-negative integer')
  if config.seed >= 2**32:
    _fail('seed', config.seed, 'must be below 2**32 (it seeds the data shuffle)')
  if not config.lr > 0:
    _fail('lr', config.lr, 'must be > 0')
  if not TRAIN_KEYS <= known:  # a task with its own loop checks the rest itself
    return _model_and_mesh(config, task, num_devices)
  if config.weight_decay < 0:
    _fail('weight_decay', config.weight_decay, 'must be >= 0')
  if config.use_scheduler and config.scheduler_type not in ('cosine', 'multistep'):
    _fail('scheduler_type', config.scheduler_type, "expected 'cosine' or 'multistep'")
  if config.warmup_steps >= config.training_iterations:
    _fail(
        'warmup_steps',
        config.warmup_steps,
        f'must be below training_iterations={config.training_iterations}',
    )
  if config.gradient_clipping != -1:
    if config.gradient_clipping_type not in ('quantile', 'norm'):
      _fail(
          'gradient_clipping_type', config.gradient_clipping_type, "expected 'quantile' or 'norm'"
      )
    if config.gradient_clipping_type == 'quantile' and not 0 < config.gradient_clipping <= 1:
      _fail(
          'gradient_clipping',
          config.gradient_clipping,
          "a quantile in (0, 1] (gradient_clipping_type='quantile'), or -1 to disable",
      )
    if config.gradient_clipping_type == 'norm' and not config.gradient_clipping > 0:
      _fail('gradient_clipping', config.gradient_clipping, 'a norm > 0, or -1 to disable')
  return _model_and_mesh(config, task, num_devices)


def _model_and_mesh(config, task, num_devices):
  try:
    model = task.make_model(config)
  except ValueError as e:
    raise ValueError(f'config.model.{e}') from None
  except TypeError as e:  # an unknown constructor argument
    raise ValueError(f'config.model: {e}') from None
  sizes = sharding.validate(config, jax.device_count() if num_devices is None else num_devices)
  task.validate_mesh(config, sizes)
  parts = config.get('init_from_parts', 'all')
  if parts not in INIT_FROM_PARTS:
    _fail('init_from_parts', parts, f'expected one of {", ".join(map(repr, INIT_FROM_PARTS))}')
  if config.init_from:
    _check_init_from(config.init_from, model, task, parts)
  elif parts != 'all':
    _fail('init_from_parts', parts, 'names parts of config.init_from, which is empty; give the run or import too')
  return task


# config.init_from_parts: 'all' (the same model, every weight) or 'core'
# (another task's CTM core: ctm_lib.CORE_FIELDS; input side and head fresh).
INIT_FROM_PARTS = ('all', 'core')


def _check_init_from(path, model, task, parts='all'):
  """config.init_from holds a training run, an import or a Hub model of this
  very model (weights aside), or with parts='core' of a CTM with this core."""
  from ctm_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top  # it imports this module

  config_path = storage.join(path, 'config.json')
  if hub.is_model_folder_or_file(path):  # the reference's Hub format: its kwargs, read as this task's
    try:
      imported_model = task.model_from_kwargs('ctm', hub.read_kwargs(path))
    except (ValueError, TypeError) as e:
      _fail('init_from', path, first_line(e))
  elif not storage.path(config_path).is_file():
    _fail(
        'init_from',
        path,
        'no training run or imported checkpoint there (no config.json); train one, or import one with '
        f'`python -m ctm_jax.interop.torch --checkpoint=FILE.pt --workdir={path}`',
    )
  elif storage.path(storage.join(path, 'checkpoints')).is_dir():  # a training run
    try:
      record = checkpoint_lib.read_config(path)
      checkpoint_lib.choose_step(storage.join(path, 'checkpoints'), None, path)
      imported_model = tasks_lib.get(record.task).make_model(record)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      _fail('init_from', path, first_line(e).replace(f'--workdir={path}: ', ''))
  else:
    try:
      manifest.check(path, 'the import', 'import it again (python -m ctm_jax.interop.torch ... --overwrite)')
    except ValueError as e:
      _fail('init_from', path, first_line(e))
    try:
      imported = json.loads(storage.path(config_path).read_text())
      imported_task = tasks_lib.get(imported['task'])
      imported_model = imported_task.model_from_kwargs(imported.get('model_type', 'ctm'), imported['model_kwargs'])
    except (OSError, ValueError, KeyError, TypeError) as e:
      _fail('init_from', path, f'{config_path} is not an import record ({e})')
  if parts == 'core':
    for which, m in (('the source', imported_model), ('config.model', model)):
      if not isinstance(m, ctm_lib.ContinuousThoughtMachine):
        _fail('init_from_parts', parts, f'{which} is a {type(m).__name__}, which has no CTM core')
    changed = [
        f'{name} (source {getattr(imported_model, name)!r}, configured {getattr(model, name)!r})'
        for name in ctm_lib.CORE_FIELDS if getattr(imported_model, name) != getattr(model, name)
    ]
    if changed:
      _fail('init_from', path, "its CTM core's shapes differ from config.model's in " + ', '.join(changed)
            + '; configure the same core, or train from scratch')
    return
  names = [
      f.name
      for f in dataclasses.fields(model)
      if f.name not in ('parent', 'name', *ctm_lib.COMPUTE_FIELDS) and f.init
  ]
  changed = [
      f'{name} (imported {getattr(imported_model, name)!r}, configured {getattr(model, name)!r})'
      for name in names
      if getattr(imported_model, name, None) != getattr(model, name)
  ]
  if type(imported_model) is not type(model):
    changed.insert(0, f'model class ({type(imported_model).__name__} vs {type(model).__name__})')
  if changed:
    _fail('init_from', path, 'the imported model differs from config.model in ' + ', '.join(changed))
