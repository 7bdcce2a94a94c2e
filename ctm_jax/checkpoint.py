"""Orbax checkpoints of the train state and the data iterator, and resume rules.

Resume precedence: the latest checkpoint in the workdir -> `config.init_from`
(a directory written by the PyTorch import command) -> fresh init.
"""

import json
import os
import re

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ctm_jax import manifest
from ctm_jax import storage
from ctm_jax import validation
from ctm_jax.models import ctm as ctm_lib
from ctm_jax.data import pipeline

CONFIG_FILE = 'config.json'
# Keys whose change makes existing checkpoints meaningless for any run; a task
# adds its own (`Task.identity_keys`).
_IDENTITY_KEYS = ('task', 'model', 'model_type')
# Compute options: a run may resume with another dtype, remat policy or unroll,
# and a workdir written before an option existed resumes with it.
_COMPUTE_KEYS = tuple(f'model.{field}' for field in ctm_lib.COMPUTE_FIELDS)


class IncompatibleWorkdir(validation.UsageError):
  """The workdir's checkpoints come from a different model."""


class SaveError(OSError):
  """A checkpoint could not be written; the newest committed one is intact."""

  def __init__(self, directory: str, step, cause: BaseException, committed: list[int] | None = None):
    committed = committed_steps(directory) if committed is None else committed
    if committed:
      kept = f'the newest committed checkpoint there, step {committed[-1]}, is intact'
      then = 'rerun the same command to resume from it'
    else:
      kept = 'no checkpoint had been committed there yet'
      then = 'rerun the same command to start again'
    super().__init__(
        f'saving checkpoint step {step} under {directory} failed: {_reason(cause)}; '
        f'{kept}: free space or fix the path, then {then}'
    )


def committed_steps(directory: str) -> list[int]:
  """Steps that orbax finished: on disk, in-progress ones carry a tmp suffix;
  in a bucket, a finished one holds orbax's commit marker."""
  if storage.is_bucket(directory):
    try:
      return sorted(ocp.utils.checkpoint_steps(storage.path(directory)))
    except (OSError, ValueError):
      return []
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  return sorted(int(n) for n in names if n.isdigit())


def choose_step(directory: str, step: int | None, workdir: str) -> int:
  """`step` if committed under `directory`, else the newest committed one when
  `step` is None; UsageError naming --step or --workdir otherwise."""
  committed = committed_steps(directory)
  if step is None:
    if not committed:
      raise validation.UsageError(f'--workdir={workdir}: no committed checkpoint under {directory}')
    return committed[-1]
  if step not in committed:
    raise validation.UsageError(
        f'--step={step}: no such checkpoint under {directory} (committed: {committed})'
    )
  return step


def _reason(error: BaseException) -> str:
  """The OS error inside an orbax/TensorStore failure, else its first line."""
  if isinstance(error, OSError) and error.errno:
    return os.strerror(error.errno)
  found = re.search(r"os_error_code='?(\d+)", str(error))
  if found:
    return os.strerror(int(found.group(1)))
  return f'{type(error).__name__}: {validation.first_line(error)[:300]}'


class NoIntactCheckpoint(validation.UsageError):
  """Every checkpoint of a workdir is damaged (each was moved aside)."""


def verify_step(workdir: str, step: int) -> str | None:
  """How a run's checkpoint `step` differs from its manifest; None when it
  matches or has none (saved before manifests, or killed before its own)."""
  path = storage.path(storage.join(workdir, 'checksums', f'{step}.json'))
  try:
    recorded = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return manifest.damage(storage.join(workdir, 'checkpoints', str(step)), recorded)


def restore_intact(workdir: str, step: int | None, restore, verified: int | None = None):
  """(step, restore(step)) for a reader of a training run: predict, evaluate,
  export, inference.load. Reads only; never moves or deletes.

  The newest committed step (or `step`) whose files match its manifest and
  that restores. Without `step`, a damaged one is passed over, saying so in
  one warning line, for the next older; one rotated away meanwhile (a
  trainer still running) is chosen again. With `step`, or when no step is
  intact, a UsageError names the damaged step and the fix. `verified`: a
  step this caller has just checked against its manifest (not read again).
  """
  directory = storage.join(workdir, 'checkpoints')
  tried = {}  # step -> why it was passed over
  while True:
    committed = committed_steps(directory)
    candidates = [step] if step is not None else [s for s in reversed(committed) if s not in tried]
    if step is not None and step not in committed:
      choose_step(directory, step, workdir)  # one line: no such step, and the committed ones
    if not candidates:
      if not tried:
        choose_step(directory, None, workdir)  # one line: no committed checkpoint
      newest = max(tried)
      raise validation.UsageError(
          f'--workdir={workdir}: no intact checkpoint (step {newest}: {tried[newest]}'
          + (f'; {len(tried) - 1} older step(s) damaged too' if len(tried) > 1 else '')
          + '); restore the checkpoints from a copy, or train again'
      )
    candidate = candidates[0]
    reason = None if candidate == verified else verify_step(workdir, candidate)
    if reason is None:
      try:
        result = restore(candidate)
      except Exception as e:  # pylint: disable=broad-except  # whatever a damaged file raises
        if candidate not in committed_steps(directory):
          if step is not None:
            raise validation.UsageError(
                f'--step={step}: the checkpoint was deleted while it was read (a running trainer '
                'keeps only the newest ones); pick a newer --step'
            ) from None
          continue  # rotated away while read: choose again
        reason = f'it does not restore: {_reason(e)}'
      else:
        if tried:
          logging.warning(
              'Using checkpoint step %d, the newest intact one (passed over: %s)',
              candidate, '; '.join(f'step {s}: {r}' for s, r in sorted(tried.items(), reverse=True)),
          )
        return candidate, result
    if step is not None:
      intact = [s for s in committed if s != step]
      raise validation.UsageError(
          f'--step={step}: checkpoint {storage.join(directory, str(step))} is damaged ({reason}); '
          + (f'pick another --step (committed: {intact})' if intact else 'restore it from a copy')
      )
    tried[candidate] = reason


class Checkpointer:
  """Asynchronous saves of items `state` and `data` under `workdir/checkpoints`.

  Every committed step gets a manifest of its files' sizes and CRC32s in
  `workdir/checksums/<step>.json`; a restore checks it first. A damaged step
  (bit rot, truncation, a lost file, an interrupted copy) is moved to
  `workdir/damaged_checkpoints/` and the next older intact step is used.
  """

  def __init__(self, workdir: str, keep: int):
    workdir = storage.resolve(workdir)
    self.workdir = workdir
    self.directory = storage.join(workdir, 'checkpoints')
    self.sums_dir = storage.join(workdir, 'checksums')
    self.damaged_dir = storage.join(workdir, 'damaged_checkpoints')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'data')
    )
    self._saving = None  # the step of the newest save started
    self._failed = None  # the SaveError already raised: later waits do not retry storage
    # Steps known committed, for a failure's message without asking failed storage again.
    self._committed = sorted(self.manager.all_steps())

  def latest_step(self):
    return self.manager.latest_step()

  def check(self):
    """Raises SaveError if an earlier background save failed (disk full, lost mount)."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except  # whatever the save thread raised
      raise self._fail(e) from e

  def save(self, step: int, state, data_iterator):
    # orbax waits for the previous save before starting one anyway; waiting
    # here first names that save's step if it failed.
    self.wait()
    self._saving = step
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:  # runs without a dataset (RL) keep everything in `state`
      items['data'] = pipeline.save_args(data_iterator)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except  # a disk full shows here or later
      raise self._fail(e) from e

  def restore(self, step: int, abstract_state, data_iterator):
    """The state onto `abstract_state`'s shardings (any mesh), the iterator in place.

    Each process saves its own iterator position. A checkpoint written by a
    different number of processes restores through the global record position,
    which the stride-sharded pipeline makes the same for any process count.
    """
    if data_iterator is None:
      return self.restore_state(step, abstract_state)
    iterator_dir = storage.join(self.directory, str(step), pipeline.DATA_ITEM)
    index, count = jax.process_index(), jax.process_count()
    if storage.path(storage.join(iterator_dir, f'process_{index}-of-{count}.json')).exists():
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

  def restore_state(self, step: int, abstract_state):
    """The train state alone (no data iterator) onto `abstract_state`'s shardings."""
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
    return restored['state']

  def _fail(self, error: BaseException) -> 'SaveError':
    self._failed = SaveError(self.directory, self._saving, error, self._committed)
    return self._failed

  def wait(self):
    if self._failed is not None:  # reported once; storage that failed is not asked again
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._fail(e) from e
    self.check()
    try:
      self._record_sums()
    except Exception as e:  # pylint: disable=broad-except  # a full disk, a lost bucket
      raise self._fail(e) from e
    self._committed = sorted(self.manager.all_steps())

  def _record_sums(self):
    """Manifests for committed steps that lack one; drops those of deleted steps."""
    if jax.process_index() != 0:
      return
    steps = set(self.manager.all_steps())
    sums_dir = storage.path(self.sums_dir)
    sums_dir.mkdir(parents=True, exist_ok=True)
    for step in steps:
      path = sums_dir / f'{step}.json'
      if not path.exists():
        storage.write_text(path, json.dumps(manifest.file_sums(storage.join(self.directory, str(step)))))
    for name in storage.names(sums_dir):
      stem = name.split('.')[0]
      if stem.isdigit() and int(stem) not in steps:
        (sums_dir / name).unlink()

  def _verify(self, step: int) -> str | None:
    return verify_step(self.workdir, step)

  def _set_aside(self, name: str, reason: str):
    """Moves a damaged step out of orbax's sight (never deletes it)."""
    storage.path(self.damaged_dir).mkdir(parents=True, exist_ok=True)
    target = storage.join(self.damaged_dir, name)
    while storage.path(target).exists():
      target += '_'
    storage.move(storage.join(self.directory, name), target)
    sums = storage.join(self.sums_dir, f'{name}.json')
    if storage.path(sums).exists():
      storage.move(sums, target + '.checksums.json')
    logging.warning('Checkpoint step %s is damaged (%s): moved to %s', name, reason, target)

  def _newest_sound_step(self, damaged: list[str]) -> int | None:
    """Sets aside, newest first, step directories orbax does not recognise and
    steps whose files differ from their manifest, until one passes (or has no
    manifest to check): returns that step, None when none is left. Appends
    what it set aside to `damaged`."""
    steps = set(self.manager.all_steps())
    for name in storage.names(self.directory):
      if name.isdigit() and int(name) not in steps:
        self._set_aside(name, 'incomplete: orbax finds no checkpoint in it')
        damaged.append(name)
    for step in sorted(steps, reverse=True):
      reason = self._verify(step)
      if reason is None:
        return step
      self._set_aside(str(step), reason)
      damaged.append(str(step))
    return None

  def _none_intact(self, damaged: str) -> NoIntactCheckpoint:
    return NoIntactCheckpoint(
        f'no intact checkpoint in {self.directory}: {damaged} damaged and moved to '
        f'{self.damaged_dir}; restore them from a copy, or remove {self.directory} to start '
        'from scratch'
    )

  def restore_latest(self, abstract_state, data_iterator, same_model: bool):
    """(state, step) of the newest intact step, or None when there is none at all.

    A step whose files differ from its manifest is damaged. A step that matches
    its manifest but does not restore is not: the error is raised (a different
    model, say), and nothing is moved. A step without a manifest that does not
    restore counts as damaged only in a single-process run and when
    `same_model` (config.json vouched for the model). Damaged steps are set
    aside, each with one warning line; NoIntactCheckpoint when steps exist but
    none is intact.
    """
    damaged = []
    if jax.process_count() > 1:
      # Process 0 judges and moves; the others restore what it names.
      step = self._newest_sound_step(damaged) if jax.process_index() == 0 else None
      agreed = multihost_utils.broadcast_one_to_all(
          np.array([-1 if step is None else step, len(damaged)], np.int64)
      )
      self.manager.reload()
      step, count = int(agreed[0]), int(agreed[1])
      if step < 0:
        if count:
          raise self._none_intact(f'{count} step(s) were')
        return None
      return self.restore(step, abstract_state, data_iterator), step
    while (step := self._newest_sound_step(damaged)) is not None:
      self.manager.reload()
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # pylint: disable=broad-except  # whatever a damaged file raises
        if storage.path(storage.join(self.sums_dir, f'{step}.json')).exists() or not same_model:
          raise
        self._set_aside(str(step), f'it does not restore: {_reason(e)}')
        damaged.append(str(step))
        continue
      if damaged:
        logging.warning('Resuming from step %d, the newest intact checkpoint', step)
      return state, step
    self.manager.reload()
    if damaged:
      raise self._none_intact(f'step(s) {", ".join(damaged)} are')
    return None

  def close(self):
    self.manager.close()


def _reshard_position(iterator_dir: str, current: dict, count: int) -> dict:
  """The iterator state of one of `count` processes from another count's files."""
  saved = [name for name in storage.names(iterator_dir) if name.startswith('process_0-of-')]
  if not saved:
    raise ValueError(f'{iterator_dir}: no data iterator state to restore')
  saved_count = int(saved[0].rsplit('-', 1)[1].split('.')[0])
  state = json.loads(storage.path(storage.join(iterator_dir, saved[0])).read_text())
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


def check_config(workdir: str, config, resuming: bool, identity_keys=()):
  """Refuses a workdir whose checkpoints came from another model; writes nothing.

  Identity: `task`, `model`, `model_type` and the task's `identity_keys`; compute options
  (dtype, remat, backbone_remat, unroll, deferred_grads) may change.
  """
  path = storage.path(storage.join(workdir, CONFIG_FILE))
  resolved = json.loads(config.to_json_best_effort())
  if resuming and path.exists():
    previous = json.loads(path.read_text())
    keys = (*_IDENTITY_KEYS, *identity_keys)
    old, new = _identity(previous, keys), _identity(resolved, keys)
    for flat in (old, new):  # runs written before model types existed trained a CTM
      flat.setdefault('model_type', 'ctm')
    for key in _COMPUTE_KEYS:
      old.pop(key, None), new.pop(key, None)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
      raise IncompatibleWorkdir(
          f'workdir {workdir} holds checkpoints of a different model '
          f'(changed: {", ".join(changed)}); use a new --workdir or restore the config'
      )


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """A run's workdir/config.json; UsageError naming the workdir when there is none."""
  path = storage.path(storage.join(workdir, CONFIG_FILE))
  if not path.is_file():
    raise validation.UsageError(f'--workdir={workdir}: no {CONFIG_FILE} there (not a training run)')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def write_config(workdir: str, config) -> str:
  """workdir/config.json, replaced whole (process 0 writes it). Returns its path."""
  path = storage.join(workdir, CONFIG_FILE)
  resolved = json.loads(config.to_json_best_effort())
  if jax.process_index() != 0:
    return path
  storage.write_text(path, json.dumps(resolved, indent=2, sort_keys=True))
  return path
