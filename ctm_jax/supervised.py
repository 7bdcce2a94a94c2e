"""Supervised training as a `Program` (ctm_jax/program.py): a task's data,
loss and metrics made into the jitted steps, the host batches and the
evaluators the training loop (ctm_jax/train.py) runs. The default of
`Task.training`; it knows no task.
"""

import dataclasses
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import compiling
from ctm_jax import evaluators as evaluators_lib
from ctm_jax import optim
from ctm_jax import program as program_lib
from ctm_jax import sharding
from ctm_jax import steps
from ctm_jax import validation
from ctm_jax.data import pipeline

STOP_KEY = program_lib.STOP_KEY


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

  rules = sharding.rules_of(config.mesh)
  abstract = jax.eval_shape(init)
  declared = sharding.declared_axes(lambda: model.init(jax.random.key(config.seed), example))
  state_shardings = sharding.state_shardings(abstract, mesh, declared, rules)
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
      train_step=compiling.jit(
          sharding.under_rules(train_step, rules),
          in_shardings=(state_shardings, batch_sharding),
          out_shardings=(state_shardings, replicated),
          donate_argnums=0,
      ),
      eval_step=compiling.jit(
          sharding.under_rules(eval_step, rules),
          in_shardings=(state_shardings, batch_sharding),
          out_shardings=replicated,
      ),
  )


def check_data_sizes(config, train_source, eval_source):
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


class Summary:
  """Train metrics of a log window: batch sums -> `train/<metric>` means, the
  mean gradient norm, the last learning rate and steps per second."""

  def __init__(self):
    self.sums, self.grad_norm, self.steps, self.lr = None, 0.0, 0, 0.0

  def add(self, metrics: dict) -> None:
    sums = {k: v for k, v in metrics.items() if k.endswith('_sum') or k == 'count'}
    self.sums = steps.add_sums(self.sums, sums)
    self.grad_norm += float(metrics['grad_norm'])
    self.lr = float(metrics['lr'])
    self.steps += 1

  def flush(self, done: int, seconds: float):
    del done
    scalars = _summarise(self.sums, 'train')
    scalars.update(
        {
            'train/grad_norm': self.grad_norm / self.steps,
            'train/lr': self.lr,
            'train/steps_per_s': self.steps / max(seconds, 1e-9),
        }
    )
    postfix = {'loss': f"{scalars['train/loss']:.4f}"}
    if 'train/acc_most_certain' in scalars:
      postfix['acc'] = f"{scalars['train/acc_most_certain']:.3f}"
    self.__init__()
    return scalars, postfix


class Training:
  """A task's supervised training. Made before the workdir is touched: the
  data is checked, its sources opened once (a source may read a whole dataset
  into memory) and the batch sizes checked against them."""

  def __init__(self, task, config, model):
    task.check_data(config)
    self.task, self.config, self.model = task, config, model
    self.train_source, self.eval_source = task.train_source(config), task.eval_source(config)
    check_data_sizes(config, self.train_source, self.eval_source)

  def program(self, mesh, plot_dir: str, started: float) -> program_lib.Program:
    config, task, model = self.config, self.task, self.model
    run = setup(config, model, task, mesh)
    train_loader = pipeline.make_train_loader(
        self.train_source,
        batch_size=config.batch_size // jax.process_count(),  # per host
        seed=config.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        worker_count=config.num_workers_train,
        read_options=grain.ReadOptions(num_threads=config.num_read_threads),
        transform=task.train_transform(config),
    )
    context = make_context(config, task, model, run, self.eval_source, plot_dir, started)

    def with_weights(state, variables):
      return state.replace(
          params=variables['params'],
          opt_state=run.tx.init(variables['params']),
          batch_stats=variables.get('batch_stats', {}),
          synch=variables.get('synch', {}),
      )

    def beyond_total(latest, workdir):
      return (
          f'config.training_iterations={config.training_iterations}: {workdir} already holds '
          f'a checkpoint at step {latest}; pass --config.training_iterations={latest} or more '
          'to continue it, or another --workdir'
      )

    return program_lib.Program(
        describe=task.name,
        unit='step',
        total=config.training_iterations,
        beyond_total=beyond_total,
        mesh=mesh,
        abstract_state=run.abstract_state,
        state_shardings=run.state_shardings,
        init=run.init,
        step=run.train_step,
        batches=iter(train_loader),
        summary=Summary(),
        watched=('loss', 'grad_norm'),
        evaluators=task.evaluators(config, context),
        with_weights=with_weights,
    )
