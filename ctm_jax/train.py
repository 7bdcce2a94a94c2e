"""train_and_evaluate: config -> task -> data -> state -> jitted steps -> loop.

The loop knows no task: the task (ctm_jax/tasks/) builds the model, data,
loss and metrics, and lists the evaluators the loop runs at each eval.
"""

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable

from absl import logging
import grain
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from ctm_jax import checkpoint as checkpoint_lib
from ctm_jax import evaluators as evaluators_lib
from ctm_jax import optim
from ctm_jax import sharding
from ctm_jax import steps
from ctm_jax import validation
from ctm_jax import workdir as workdir_lib
from ctm_jax import writers
from ctm_jax.data import pipeline
from ctm_jax.interop import torch as torch_interop

# Batch key (and metric) carrying each process's stop request in multi-process runs.
STOP_KEY = 'stop'


class NonFiniteError(FloatingPointError):
  pass


def _summarise(sums: dict, prefix: str) -> dict:
  """Batch sums -> means: `<metric>_sum` -> `prefix/<metric>`, and a (T,) sum
  -> `prefix/<metric>_<t>`, each divided by `count`."""
  count = float(sums['count'])
  out = {}
  for key, value in sums.items():
    if not key.endswith('_sum'):
      continue
    name = f'{prefix}/{key[: -len("_sum")]}'
    mean = np.asarray(value, np.float64) / count
    if mean.ndim == 0:
      out[name] = float(mean)
    else:
      out.update({f'{name}_{t}': float(m) for t, m in enumerate(mean.reshape(-1))})
  return out


@dataclasses.dataclass(frozen=True)
class Setup:
  """The sharded, jitted pieces of a run on one mesh (also what compile_check lowers)."""

  mesh: jax.sharding.Mesh
  schedule: Any
  tx: Any
  abstract_state: steps.TrainState  # ShapeDtypeStructs carrying their shardings
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  init: Callable[[], steps.TrainState]  # fresh state, created in its shardings
  train_step: Callable  # (state, global batch) -> (state, metrics); donates state
  eval_step: Callable  # (state, global batch) -> (metric sums, per-example arrays)


def under_rules(fn):
  """Traces `fn` with the logical axis rules, so activation constraints apply."""

  def wrapped(*args):
    with sharding.logical_rules():
      return fn(*args)

  return wrapped


def _reporting_stops(train_step):
  """Adds metrics['stop']: whether any process put a stop flag in its rows of the batch.

  Processes learn of each other's SIGTERM from a step's metrics, so all of them
  stop after the same step without an extra collective.
  """

  def step(state, batch):
    flags = batch.get(STOP_KEY)
    state, metrics = train_step(state, {k: v for k, v in batch.items() if k != STOP_KEY})
    if flags is not None:
      metrics[STOP_KEY] = jnp.any(flags)
    return state, metrics

  return step


def setup(config, model, task, mesh) -> Setup:
  schedule = optim.make_schedule(config)
  tx = optim.make_optimizer(config, schedule)
  example = task.model_inputs(task.example_batch(config))

  def init():
    return steps.init_state(model, tx, jax.random.key(config.seed), example)

  abstract = jax.eval_shape(init)
  state_shardings = sharding.state_shardings(abstract, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  train_step = _reporting_stops(
      steps.make_train_step(config, model, task, tx, schedule)
  )
  eval_step = steps.make_eval_step(config, model, task)
  return Setup(
      mesh=mesh,
      schedule=schedule,
      tx=tx,
      abstract_state=jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings
      ),
      state_shardings=state_shardings,
      batch_sharding=batch_sharding,
      init=jax.jit(init, out_shardings=state_shardings),
      train_step=jax.jit(
          under_rules(train_step),
          in_shardings=(state_shardings, batch_sharding),
          out_shardings=(state_shardings, replicated),
          donate_argnums=0,
      ),
      eval_step=jax.jit(
          under_rules(eval_step),
          in_shardings=(state_shardings, batch_sharding),
          out_shardings=replicated,
      ),
  )


class _StopRequest:
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


class StopAgreement(_StopRequest):
  """When to stop on a signal. One process acts on its own signal at once;
  several put their flags in their rows of each batch and learn of each
  other's through the step's metrics (a step or two later), so that every one
  saves the same step without an extra collective."""

  def __init__(self):
    super().__init__()
    self.agree = jax.process_count() > 1

  def tag(self, local_batch: dict) -> dict:
    """The batch with this process's stop flag in its rows (multi-process runs)."""
    if self.agree:
      rows = len(jax.tree.leaves(local_batch)[0])
      local_batch[STOP_KEY] = np.full((rows,), self.signal is not None)
    return local_batch

  def local(self) -> str | None:
    """This process's own signal, read once, when it need not agree with others."""
    return None if self.agree else self.signal

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


class MetricWindow:
  """Train metrics of the steps since the last log: checked, summed, logged as means."""

  def __init__(self, writer, progress, log_every: int, total: int, checkpointer):
    self.writer, self.progress = writer, progress
    self.log_every, self.total, self.checkpointer = log_every, total, checkpointer
    self._reset()

  def _what_is_kept(self) -> str:
    """The newest checkpoint and the train loss logged at or before it, or that there is none."""
    directory = self.checkpointer.directory
    latest = self.checkpointer.latest_step()
    if latest is None:
      return f'no checkpoint has been saved in {directory} yet'
    loss = None
    if self.writer.enabled and os.path.exists(self.writer.jsonl_path):
      with open(self.writer.jsonl_path) as f:
        for line in f:
          record = json.loads(line)
          if record['step'] <= latest and 'train/loss' in record:
            loss = (record['step'], record['train/loss'])
    logged = f'; train loss logged at step {loss[0]}: {loss[1]:.4g}' if loss else ''
    return f'the newest checkpoint is step {latest} in {directory}{logged}'

  def _reset(self):
    self.sums, self.grad_norm, self.steps = None, 0.0, 0
    self.start = time.perf_counter()

  def consume(self, step: int, metrics, flush: bool = False) -> bool:
    """Host side of step `step`, read one step late. Raises NonFiniteError on a
    blown-up step; returns whether some process asked to stop (multi-process)."""
    metrics = jax.device_get(metrics)
    if not metrics['finite']:
      bad = {k: float(metrics[k]) for k in ('loss', 'grad_norm')}
      raise NonFiniteError(
          f'non-finite training metrics at step {step + 1}: {bad}; the state was not '
          f'updated and nothing non-finite was saved: {self._what_is_kept()}'
      )
    sums = {k: v for k, v in metrics.items() if k.endswith('_sum') or k == 'count'}
    self.sums = steps.add_sums(self.sums, sums)
    self.grad_norm += float(metrics['grad_norm'])
    self.steps += 1
    done = step + 1
    self.progress.update(1)
    if done % self.log_every == 0 or done == self.total or flush:
      scalars = _summarise(self.sums, 'train')
      elapsed = time.perf_counter() - self.start
      scalars.update(
          {
              'train/grad_norm': self.grad_norm / self.steps,
              'train/lr': float(metrics['lr']),
              'train/steps_per_s': self.steps / max(elapsed, 1e-9),
          }
      )
      self.writer.write(done, scalars)
      postfix = {'loss': f"{scalars['train/loss']:.4f}"}
      if 'train/acc_most_certain' in scalars:
        postfix['acc'] = f"{scalars['train/acc_most_certain']:.3f}"
      self.progress.set_postfix(postfix, refresh=False)
      self._reset()
    return bool(metrics.get(STOP_KEY, False))


def _initial_state(config, model, run: Setup, checkpointer, train_iterator, same_model):
  """Resume order: latest in workdir -> config.init_from -> fresh init.

  The state is created or restored directly in its shardings: no device holds
  more of it than the mesh assigns.
  """
  restored = checkpointer.restore_latest(run.abstract_state, train_iterator, same_model)
  if restored is not None:
    logging.info('Resumed from %s/%d', checkpointer.directory, restored[1])
    return restored[0], 'resumed'
  state = run.init()
  if config.init_from:
    _, variables, _ = torch_interop.load_imported(config.init_from)  # checked by validation
    state = state.replace(
        params=variables['params'],
        opt_state=run.tx.init(variables['params']),
        batch_stats=variables.get('batch_stats', {}),
        synch=variables.get('synch', {}),
    )
    return jax.device_put(state, run.state_shardings), f'initialised from {config.init_from}'
  return state, 'fresh'


def _check_data_sizes(config, train_source, eval_source):
  """Batches the data cannot fill, named by their config field (UsageError)."""
  shards = jax.process_count()
  records = len(train_source)
  if pipeline.train_batches_per_epoch(records, config.batch_size // shards, shards) < 1:
    raise validation.UsageError(
        f'config.batch_size={config.batch_size}: the train set has {records} records; '
        f'pass a batch size of at most {records // shards * shards}'
    )
  records = len(eval_source)
  available = pipeline.eval_batches_available(records, config.batch_size_test // shards, shards)
  if available < config.n_test_batches:
    field, value = ('batch_size_test', config.batch_size_test) if not available else (
        'n_test_batches', config.n_test_batches
    )
    raise validation.UsageError(
        f'config.{field}={value}: the held-out set has {records} records, '
        f'{available} batch(es) of batch_size_test={config.batch_size_test}; pass '
        + (
            f'--config.n_test_batches={available} or fewer'
            if available
            else f'--config.batch_size_test={records // shards * shards} or less'
        )
    )


def make_context(config, task, model, run, eval_source, plot_dir, started):
  """What the task's evaluators use: the held-out batches of this process."""
  return evaluators_lib.Context(
      config=config,
      task=task,
      model=model,
      run=run,
      eval_source=eval_source,
      # Kept on the host and sent per eval: a large held-out set would
      # otherwise hold GiBs of accelerator memory for the whole run.
      eval_batches=pipeline.make_eval_batches(
          eval_source,
          batch_size=config.batch_size_test // jax.process_count(),  # per host
          num_batches=config.n_test_batches,
          shard_index=jax.process_index(),
          shard_count=jax.process_count(),
          read_options=grain.ReadOptions(num_threads=config.num_read_threads),
      ),
      plot_dir=plot_dir,
      started=started,
  )


def train_and_evaluate(config, workdir: str):
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the state.

  Every process of a multi-host run calls this with the same arguments.
  """
  started = time.perf_counter()
  task, model = validation.validate(config)
  if task.own_loop() is not None:
    return task.own_loop()(config, workdir, model)
  task.check_data(config)  # before anything is written or compiled
  # Built once: a source may read a whole dataset into memory (maze folders).
  sources = (task.train_source(config), task.eval_source(config))
  _check_data_sizes(config, *sources)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    workdir = workdir_lib.prepare(workdir)
    with workdir_lib.Lock(workdir, jax.process_index()):
      return _train_and_evaluate(config, workdir, task, model, mesh, started, sources)


def _train_and_evaluate(config, workdir, task, model, mesh, started, sources):
  train_source, eval_source = sources
  is_chief = jax.process_index() == 0
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints)
  try:  # until the loop's own cleanup takes over
    latest = checkpointer.latest_step()
    resuming = latest is not None
    if resuming and latest > config.training_iterations:
      raise validation.UsageError(
          f'config.training_iterations={config.training_iterations}: {workdir} already holds '
          f'a checkpoint at step {latest}; pass --config.training_iterations={latest} or more '
          'to continue it, or another --workdir'
      )
    checkpoint_lib.check_config(workdir, config, resuming, task.identity_keys)
    has_config = os.path.exists(os.path.join(workdir, checkpoint_lib.CONFIG_FILE))
    run = setup(config, model, task, mesh)
    train_loader = pipeline.make_train_loader(
        train_source,
        batch_size=config.batch_size // jax.process_count(),  # per host
        seed=config.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        worker_count=config.num_workers_train,
        read_options=grain.ReadOptions(num_threads=config.num_read_threads),
        transform=task.train_transform(config),
    )
    train_iterator = iter(train_loader)
    try:
      state, how = _initial_state(config, model, run, checkpointer, train_iterator, has_config)
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
    start, total = int(state.step), config.training_iterations
    plot_dir = os.path.join(workdir, 'plots')
    context = make_context(config, task, model, run, eval_source, plot_dir, started)
    evaluators = task.evaluators(config, context)
    writer = writers.MetricWriter(workdir, resume_step=start)
  except BaseException:
    checkpointer.close()
    raise
  if is_chief:
    os.makedirs(plot_dir, exist_ok=True)
  logging.info(
      'Run %s (%s at step %d) on mesh %s, process %d of %d. Workdir %s: config %s, '
      'checkpoints %s, metrics %s, TensorBoard %s, plots %s',
      task.name,
      how,
      start,
      dict(mesh.shape),
      jax.process_index(),
      jax.process_count(),
      workdir,
      config_path,
      checkpointer.directory,
      writer.jsonl_path,
      writer.tensorboard_dir,
      plot_dir,
  )
  progress = tqdm.tqdm(
      total=total, initial=start, unit='step', dynamic_ncols=True, disable=not is_chief
  )
  window = MetricWindow(writer, progress, config.log_every, total, checkpointer)
  cadence = Cadence(config.save_every, config.track_every, total)
  pending = None  # (step, metrics) not yet read on the host
  try:
    with StopAgreement() as stops:
      for step in range(start, total):
        batch = sharding.global_batch(stops.tag(next(train_iterator)), mesh)
        state, metrics = run.train_step(state, batch)
        done = step + 1
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
          for evaluator in evaluators:  # every process: eval steps are SPMD programs
            scalars.update(evaluator.run(state, done))
          writer.write(done, scalars)
        if cadence.saves(done) or stopping:
          checkpointer.save(done, state, train_iterator)
        elif done % config.log_every == 0:
          checkpointer.check()  # a failed background save stops the run now
        if stopping:
          logging.info('%s: checkpointed step %d, exiting', stopping, done)
          break
      if pending is not None:
        window.consume(*pending)
  finally:
    progress.close()
    try:
      checkpointer.wait()  # raises SaveError if the last save failed
    finally:
      checkpointer.close()
      writer.close()
  return state
