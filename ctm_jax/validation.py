"""Whole-config validation, before anything is compiled or written."""

import numbers

import jax

from ctm_jax import sharding
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
        'mesh',
    }
)


class UsageError(ValueError):
  """A mistake the user can fix (a field, a path, a workdir): shown as one line, exit 2."""


def _fail(field, value, why):
  raise ValueError(f'config.{field}={value!r}: {why}')


def _is_int(value):
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate(config, num_devices: int | None = None):
  """Raises ValueError naming the first bad field; returns the task and model.

  The mesh is checked against `num_devices` (default: every device of every process).
  """
  if 'task' not in config:
    _fail('task', None, 'missing; expected one of ' + ', '.join(tasks_lib.names()))
  task = tasks_lib.get(config.task)
  known = TRAIN_KEYS | task.config_keys
  for key in config:
    if key not in known:
      _fail(key, config[key], f'unknown key for task {config.task!r}')
  for key in sorted(known - set(config)):
    _fail(key, None, 'missing')
  task.validate(config)
  for field in _POSITIVE_INTS:
    value = config.get(field)
    if not _is_int(value) or value < 1:
      _fail(field, value, 'must be a positive integer')
  for field in _NON_NEGATIVE_INTS:
    value = config.get(field)
    if not _is_int(value) or value < 0:
      _fail(field, value, 'must be a non-negative integer')
  if not config.lr > 0:
    _fail('lr', config.lr, 'must be > 0')
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
  try:
    model = task.make_model(config)
  except ValueError as e:
    raise ValueError(f'config.model.{e}') from None
  except TypeError as e:  # an unknown constructor argument
    raise ValueError(f'config.model: {e}') from None
  sharding.validate(config, jax.device_count() if num_devices is None else num_devices)
  return task, model
