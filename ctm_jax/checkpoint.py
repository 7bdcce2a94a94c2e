"""Orbax checkpoints of the train state and the data iterator, and resume rules.

Resume precedence: the latest checkpoint in the workdir -> `config.init_from`
(a directory written by the PyTorch import command) -> fresh init.
"""

import json
import os

import jax
import orbax.checkpoint as ocp

from ctm_jax.data import pipeline

CONFIG_FILE = 'config.json'
# Keys whose change makes existing checkpoints meaningless for any run; a task
# adds its own (`Task.identity_keys`).
_IDENTITY_KEYS = ('task', 'model')
# Compute options: a run may resume with another dtype, remat policy or unroll.
_COMPUTE_KEYS = ('model.dtype', 'model.remat', 'model.unroll')


class IncompatibleWorkdir(ValueError):
  pass


class Checkpointer:
  """Asynchronous saves of items `state` and `data` under `workdir/checkpoints`."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'data')
    )

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator):
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=pipeline.save_args(data_iterator)
        ),
        force=True,
    )

  def restore(self, step: int, abstract_state, data_iterator):
    """The state onto `abstract_state`'s shardings (any mesh), the iterator in place.

    Each process saves its own iterator position. A checkpoint written by a
    different number of processes restores through the global record position,
    which the stride-sharded pipeline makes the same for any process count.
    """
    iterator_dir = os.path.join(self.directory, str(step), pipeline.DATA_ITEM)
    index, count = jax.process_index(), jax.process_count()
    if os.path.exists(os.path.join(iterator_dir, f'process_{index}-of-{count}.json')):
      restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=pipeline.restore_args(data_iterator),
          ),
      )
      return restored['state']
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
    data_iterator.set_state(_reshard_position(iterator_dir, data_iterator.get_state(), count))
    return restored['state']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _reshard_position(iterator_dir: str, current: dict, count: int) -> dict:
  """The iterator state of one of `count` processes from another count's files."""
  saved = sorted(f for f in os.listdir(iterator_dir) if f.startswith('process_0-of-'))
  if not saved:
    raise ValueError(f'{iterator_dir}: no data iterator state to restore')
  saved_count = int(saved[0].rsplit('-', 1)[1].split('.')[0])
  with open(os.path.join(iterator_dir, saved[0])) as f:
    state = json.load(f)
  if set(state) != {'next_index'} or set(current) != {'next_index'}:
    raise ValueError(
        f'{iterator_dir}: the data iterator was saved by {saved_count} processes and this run has '
        f'{count}; moving its position needs config.num_workers_train=0 in both runs'
    )
  records = state['next_index'] * saved_count  # global records consumed
  if records % count:
    raise ValueError(
        f'{iterator_dir}: {records} records consumed by {saved_count} processes do not split '
        f'over {count} processes'
    )
  return {'next_index': records // count}


def _identity(config_dict, keys, prefix=''):
  """Dotted key -> value of the fields (top-level `keys`) that define the model and task."""
  flat = {}
  for key, value in config_dict.items():
    if not prefix and key not in keys:
      continue
    if isinstance(value, dict):
      flat.update(_identity(value, keys, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat


def write_or_check_config(workdir: str, config, resuming: bool, identity_keys=()):
  """Writes config.json; refuses a workdir whose checkpoints came from another model.

  Identity: `task`, `model` and the task's `identity_keys`; compute options
  (dtype, remat, unroll) may change.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  resolved = json.loads(config.to_json_best_effort())
  if resuming and os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    keys = (*_IDENTITY_KEYS, *identity_keys)
    old, new = _identity(previous, keys), _identity(resolved, keys)
    for key in _COMPUTE_KEYS:
      old.pop(key, None), new.pop(key, None)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
      raise IncompatibleWorkdir(
          f'workdir {workdir} holds checkpoints of a different model '
          f'(changed: {", ".join(changed)}); use a new --workdir or restore the config'
      )
  if jax.process_index() != 0:
    return path
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(resolved, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path
