"""The training loop: config -> task -> its Program -> steps, checkpoints, evals.

One loop for every task. It owns the workdir and its lock, restore /
`init_from` / fresh init, the config record, checkpoints, metric writers, the
progress bar, the log / eval / save cadence and stop requests (SIGTERM,
SIGINT); the task's `Program` (ctm_jax/program.py; supervised ones from
ctm_jax/supervised.py) supplies the step, its batches, its metrics' summary
and its evaluators. The loop names no task.
"""

import dataclasses
import json
import shutil
import signal
import tempfile
import time

from absl import logging
import jax
import numpy as np
import tqdm

from ctm_jax import checkpoint as checkpoint_lib
from ctm_jax import inference
from ctm_jax.models import ctm as ctm_lib
from ctm_jax import program as program_lib
from ctm_jax import sharding
from ctm_jax import steps
from ctm_jax import storage
from ctm_jax import validation
from ctm_jax import workdir as workdir_lib
from ctm_jax import writers
from ctm_jax.interop import hub
from ctm_jax.interop import torch as torch_interop

STOP_KEY = program_lib.STOP_KEY


class NonFiniteError(FloatingPointError):
  pass


class StopRequest:
  """SIGTERM / SIGINT ask the loop to checkpoint and leave at the next step."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class StopAgreement(StopRequest):
  """When to stop on a signal, every process at the same step. One process
  acts on its own signal at once. Several, on a program with batches, put
  their flags in their rows of each batch and learn of each other's through
  the step's metrics (a step or two later), without an extra collective; on a
  program that makes its own data, they all-gather the flags after each step."""

  def __init__(self, in_batches: bool):
    super().__init__()
    multi = jax.process_count() > 1
    self.agree, self.gather = multi and in_batches, multi and not in_batches

  def tag(self, local_batch: dict) -> dict:
    """The batch with this process's stop flag in its rows (multi-process runs)."""
    if self.agree:
      rows = len(jax.tree.leaves(local_batch)[0])
      local_batch[STOP_KEY] = np.full((rows,), self.signal is not None)
    return local_batch

  def local(self) -> str | None:
    """The reason to stop now, when it need not wait for a step's metrics."""
    if self.agree:
      return None
    if self.gather:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      flags = multihost_utils.process_allgather(np.array(self.signal is not None))
      return (self.signal or 'a stop on another process') if np.any(flags) else None
    return self.signal

  def reported(self, flag: bool) -> str | None:
    """The reason to stop when a step's metrics say some process asked to."""
    return (self.signal or 'a stop on another process') if flag else None


@dataclasses.dataclass(frozen=True)
class Cadence:
  """Which steps (counted after the update) checkpoint and which evaluate."""

  save_every: int
  track_every: int
  total: int

  def saves(self, done: int) -> bool:
    return done % self.save_every == 0 or done == self.total

  def evals(self, done: int) -> bool:
    return done % self.track_every == 0 or done == self.total


# A logged train loss this many times the lowest logged before it is diverging.
DIVERGENCE_FACTOR, DIVERGENCE_FLOOR = 100, 0.01


class MetricWindow:
  """Step metrics since the last log: checked, fed to the program's summary,
  logged at the log cadence."""

  def __init__(self, program, writer, progress, log_every: int, checkpointer):
    self.program, self.writer, self.progress = program, writer, progress
    self.log_every, self.checkpointer = log_every, checkpointer
    self.start = time.perf_counter()
    self.lowest_loss = None  # of this process's logged windows: the divergence baseline
    self.warned = False

  def _diverging(self, done: int, scalars: dict, postfix: dict) -> None:
    """train/diverging (1.0 or 0.0) in the scalars, and DIVERGING on the progress
    line, while the logged loss is DIVERGENCE_FACTOR x the lowest logged so far
    (floored at DIVERGENCE_FLOOR: a loss near zero may wobble)."""
    loss = scalars.get('train/loss')
    if loss is None or not np.isfinite(loss):
      return
    baseline = None if self.lowest_loss is None else max(self.lowest_loss, DIVERGENCE_FLOOR)
    diverging = baseline is not None and loss > DIVERGENCE_FACTOR * baseline
    self.lowest_loss = loss if self.lowest_loss is None else min(self.lowest_loss, loss)
    scalars['train/diverging'] = float(diverging)
    if diverging:
      postfix['DIVERGING'] = f'loss {loss:.3g} vs {baseline:.3g}'
      if not self.warned:
        logging.warning(
            'train/loss %.4g at %s %d is over %dx the lowest logged (%.4g): the run is diverging; '
            'stop it and resume from a checkpoint before it with a smaller --config.lr',
            loss, self.program.unit, done, DIVERGENCE_FACTOR, self.lowest_loss,
        )
        self.warned = True

  def _what_is_kept(self) -> str:
    """The newest checkpoint and the train loss logged at or before it, or that there is none."""
    directory = self.checkpointer.directory
    latest = self.checkpointer.latest_step()
    if latest is None:
      return f'no checkpoint has been saved in {directory} yet'
    loss = None
    records = storage.path(self.writer.jsonl_path)
    if self.writer.enabled and records.exists():
      for line in records.read_text().splitlines():
        record = json.loads(line)
        if record['step'] <= latest and 'train/loss' in record:
          loss = (record['step'], record['train/loss'])
    logged = f'; train loss logged at {self.program.unit} {loss[0]}: {loss[1]:.4g}' if loss else ''
    return f'the newest checkpoint is {self.program.unit} {latest} in {directory}{logged}'

  def consume(self, step: int, metrics, flush: bool = False) -> bool:
    """Host side of step `step`, read one step late. Raises NonFiniteError on a
    blown-up step; returns whether some process asked to stop (multi-process)."""
    metrics = jax.device_get(metrics)
    if not metrics[program_lib.FINITE_KEY]:
      bad = {k: float(metrics[k]) for k in self.program.watched if k in metrics}
      raise NonFiniteError(
          f'non-finite training metrics at {self.program.unit} {step + 1}: {bad}; the state '
          f'was not updated and nothing non-finite was saved: {self._what_is_kept()}; resume from '
          'it with a lower learning rate (the same command with a smaller --config.lr)'
      )
    stop = bool(metrics.get(STOP_KEY, False))
    self.program.summary.add(
        {k: v for k, v in metrics.items() if k not in (program_lib.FINITE_KEY, STOP_KEY)}
    )
    done = step + 1
    self.progress.update(1)
    if done % self.log_every == 0 or done == self.program.total or flush:
      scalars, postfix = self.program.summary.flush(done, time.perf_counter() - self.start)
      self._diverging(done, scalars, postfix)
      self.writer.write(done, scalars)
      self.progress.set_postfix(postfix, refresh=False)
      self.start = time.perf_counter()
    return stop


class Profile:
  """config.profile_steps='A,B': a jax.profiler trace of steps A..B in
  WORKDIR/profile/ (every process traces its host). Into a bucket it is
  traced to a local folder and copied up when it stops: the profiler writes
  local files."""

  def __init__(self, config, workdir: str, start: int):
    span = validation.profile_range(config)
    self.first, self.last = (max(span[0], start + 1), span[1]) if span else (0, -1)
    self.target = storage.join(workdir, 'profile')
    self.bucket = storage.is_bucket(workdir)
    self.folder = None

  def before(self, done: int):
    if done == self.first and self.first <= self.last:
      self.folder = tempfile.mkdtemp(prefix='ctm_profile_') if self.bucket else self.target
      jax.profiler.start_trace(self.folder)
      logging.info('Tracing steps %d..%d into %s', self.first, self.last, self.target)

  def after(self, done: int, metrics):
    if self.folder is not None and done == self.last:
      jax.block_until_ready(metrics)
      self.stop()

  def stop(self):
    if self.folder is None:
      return
    jax.profiler.stop_trace()
    if self.bucket:
      storage.copy_up(self.folder, self.target)
      shutil.rmtree(self.folder, ignore_errors=True)
    logging.info('Profile written to %s (tensorboard --logdir=%s, Profile tab)', self.target, self.target)
    self.folder = None


def _init_from_variables(path: str, task: str):
  """The variables config.init_from names: a training run's newest intact
  checkpoint (damaged steps passed over, said in one line), an import or a
  Hub model."""
  if not hub.is_model_folder_or_file(path) and storage.path(storage.join(path, 'checkpoints')).is_dir():
    return inference.load_step(path)[1]
  return torch_interop.load_imported(path, task)[1]


def _initial_state(config, program, checkpointer, same_model):
  """Resume order: latest in workdir -> config.init_from -> fresh init.

  The state is created or restored directly in its shardings: no device holds
  more of it than the mesh assigns.
  """
  restored = checkpointer.restore_latest(program.abstract_state, program.batches, same_model)
  if restored is not None:
    logging.info('Resumed from %s/%d', checkpointer.directory, restored[1])
    return restored[0], 'resumed'
  state = program.init()
  if config.init_from:
    variables = _init_from_variables(config.init_from, config.task)  # checked by validation
    parts = config.get('init_from_parts', 'all')
    if parts == 'core':  # another task's core; this task's input side and head as initialised
      variables = ctm_lib.with_core(steps.variables(state, state.params), variables)
    state = program.with_weights(state, variables)
    how = f'initialised from {config.init_from}' + (' (its CTM core)' if parts == 'core' else '')
    return jax.device_put(state, program.state_shardings), how
  return state, 'fresh'


def train_and_evaluate(config, workdir: str):
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the state.

  Every process of a multi-host run calls this with the same arguments.
  """
  started = time.perf_counter()
  task = validation.validate(config)
  model = task.make_model(config)
  training = task.training(config, model)  # its checks run before anything is written
  validation.check_memory(config, model, task)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    workdir = workdir_lib.prepare(workdir)
    with workdir_lib.Lock(workdir, jax.process_index()):
      return _run(config, workdir, task, training, mesh, started)


def _run(config, workdir, task, training, mesh, started):
  is_chief = jax.process_index() == 0
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints)
  plot_dir = storage.join(workdir, 'plots')
  try:  # until the loop's own cleanup takes over
    latest = checkpointer.latest_step()
    resuming = latest is not None
    program = training.program(mesh, plot_dir, started)
    if resuming and latest > program.total:
      raise validation.UsageError(program.beyond_total(latest, workdir))
    checkpoint_lib.check_config(workdir, config, resuming, task.identity_keys)
    has_config = storage.path(storage.join(workdir, checkpoint_lib.CONFIG_FILE)).exists()
    try:
      state, how = _initial_state(config, program, checkpointer, has_config)
    except checkpoint_lib.NoIntactCheckpoint:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if resuming and not has_config:  # nothing says which model wrote the checkpoints
        raise checkpoint_lib.IncompatibleWorkdir(
            f'workdir {workdir} holds checkpoints that do not fit this config, and no '
            f'{checkpoint_lib.CONFIG_FILE} saying which config wrote them; use a new --workdir'
        ) from e
      raise
    # Written only now: a refused or failed start leaves the workdir's record as it was.
    config_path = checkpoint_lib.write_config(workdir, config)
    start, total = int(state.step), program.total
    writer = writers.MetricWriter(workdir, resume_step=start)
  except BaseException:
    checkpointer.close()
    raise
  if is_chief:
    storage.path(plot_dir).mkdir(parents=True, exist_ok=True)
  logging.info(
      'Run %s (%s at %s %d of %d) on mesh %s, process %d of %d. Workdir %s: config %s, '
      'checkpoints %s, metrics %s, TensorBoard %s, plots %s',
      program.describe, how, program.unit, start, total, dict(mesh.shape), jax.process_index(),
      jax.process_count(), workdir, config_path, checkpointer.directory, writer.jsonl_path,
      writer.tensorboard_dir, plot_dir,
  )
  progress = tqdm.tqdm(
      total=total, initial=start, unit=program.unit, dynamic_ncols=True, disable=not is_chief
  )
  window = MetricWindow(program, writer, progress, config.log_every, checkpointer)
  cadence = Cadence(config.save_every, config.track_every, total)
  batches = program.batches
  pending = None  # (step, metrics) not yet read on the host
  profile = Profile(config, workdir, start)
  try:
    with StopAgreement(in_batches=batches is not None) as stops:
      for step in range(start, total):
        profile.before(step + 1)
        if batches is None:
          state, metrics = program.step(state)
        else:
          state, metrics = program.step(state, sharding.global_batch(stops.tag(next(batches)), mesh))
        done = step + 1
        profile.after(done, metrics)
        # The previous step's metrics, read while this step runs.
        stopping = stops.reported(window.consume(*pending)) if pending else None
        pending = (step, metrics)
        stopping = stopping or stops.local()
        if cadence.saves(done) or cadence.evals(done) or stopping:
          # A checkpoint or an eval never follows an unchecked step; a stop logs its window.
          reported = stops.reported(window.consume(*pending, flush=bool(stopping)))
          stopping = stopping or reported
          pending = None
        if cadence.evals(done):
          scalars = {}
          for evaluator in program.evaluators:  # every process: eval steps are SPMD programs
            scalars.update(evaluator.run(state, done))
          writer.write(done, scalars)
        if cadence.saves(done) or stopping:
          checkpointer.save(done, state, batches)
        elif done % config.log_every == 0:
          checkpointer.check()  # a failed background save stops the run now
        if stopping:
          logging.info('%s: checkpointed %s %d, exiting', stopping, program.unit, done)
          break
      if pending is not None:
        window.consume(*pending)
  finally:
    progress.close()
    profile.stop()
    try:
      checkpointer.wait()  # raises SaveError if the last save failed
    finally:
      checkpointer.close()
      writer.close()
  logging.info('Done in %.0f s', time.perf_counter() - started)
  return state
