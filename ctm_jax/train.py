"""train_and_evaluate: config -> data -> state -> jitted steps -> loop.

Dimension glossary: B batch, T ticks, N attended positions (an h x w feature map).
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
from ctm_jax import optim
from ctm_jax import sharding
from ctm_jax import steps
from ctm_jax import validation
from ctm_jax import writers
from ctm_jax.analysis import evaluation
from ctm_jax.analysis import metrics as metrics_lib
from ctm_jax.analysis import plots
from ctm_jax.data import pipeline
from ctm_jax.interop import torch as torch_interop

# Batch key (and metric) carrying each process's stop request in multi-process runs.
STOP_KEY = 'stop'


class NonFiniteError(FloatingPointError):
  pass


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


def _prepare_workdir(workdir: str) -> str:
  if '://' in workdir:
    raise ValueError(
        f'--workdir={workdir}: URLs are not supported yet; mount the bucket on every host '
        '(e.g. gcsfuse) and give the mounted path'
    )
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f'--workdir={workdir}: cannot create it ({e.strerror})') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ValueError(f'--workdir={workdir}: not writable')
  return workdir


def _summarise(sums: dict, prefix: str) -> dict:
  """Batch sums -> means, named `prefix/...`, with per-tick accuracies."""
  count = float(sums['count'])
  acc_T = np.asarray(sums['acc_tick_sum']) / count
  out = {
      f'{prefix}/loss': float(sums['loss_sum']) / count,
      f'{prefix}/acc_most_certain': float(sums['acc_most_certain_sum']) / count,
      f'{prefix}/acc_last': float(sums['acc_last_sum']) / count,
      f'{prefix}/most_certain_tick': float(sums['most_certain_tick_sum']) / count,
  }
  out.update({f'{prefix}/acc_tick_{t}': float(a) for t, a in enumerate(acc_T)})
  return out


def _add(total, sums):
  return sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)


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


def _under_rules(fn):
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
  example = task.example_input(config)

  def init():
    return steps.init_state(model, tx, jax.random.key(config.seed), example)

  abstract = jax.eval_shape(init)
  state_shardings = sharding.state_shardings(abstract, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  train_step = _reporting_stops(
      steps.make_train_step(model, task, tx, schedule, config.use_most_certain)
  )
  eval_step = steps.make_eval_step(model, task, config.use_most_certain)
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
          _under_rules(train_step),
          in_shardings=(state_shardings, batch_sharding),
          out_shardings=(state_shardings, replicated),
          donate_argnums=0,
      ),
      eval_step=jax.jit(
          _under_rules(eval_step),
          in_shardings=(state_shardings, batch_sharding),
          out_shardings=replicated,
      ),
  )


def _attention_gifs(config, task, model, run: Setup, eval_source, plot_dir):
  """(state, step) -> writes `plot_dir/attention_{step}_{i}.gif` for the first
  `config.n_attention_gifs` eval images (process 0); None when there are none to make.

  Gifs need images (4-D inputs), attention heads and class probabilities
  (`task.eval_details`). The images are the same records on every process, so
  they go in replicated; the step is jitted once and runs without the logical
  rules, whose batch constraint a few images cannot satisfy.
  """
  count = min(config.n_attention_gifs, len(eval_source))
  if not count:
    return None
  if task.eval_details is None or not model.heads or task.example_input(config).ndim != 4:
    logging.warning(
        'config.n_attention_gifs=%d: no attention gifs, task %s does not attend over images',
        count,
        task.name,
    )
    return None
  records = [eval_source[i] for i in range(count)]
  images = np.stack([np.asarray(r['inputs']) for r in records])
  labels = [int(r['targets']) for r in records]
  grid = steps.feature_grid(model, images.shape[1:])
  replicated = sharding.replicated(run.mesh)
  images_global = jax.make_array_from_callback(images.shape, replicated, lambda i: images[i])
  attention_step = jax.jit(
      steps.make_attention_step(model, min(5, model.out_dims)),
      in_shardings=(run.state_shardings, replicated),
      out_shardings=replicated,
  )

  def write(state, step):
    tracked = jax.device_get(attention_step(state, images_global))
    if jax.process_index() != 0:
      return
    attention_BxTxN = tracked['attention_BxTxN']
    if attention_BxTxN.shape[-1] != grid[0] * grid[1]:
      raise ValueError(f'attention over {attention_BxTxN.shape[-1]} positions, not a {grid} map')
    for i, (image, label) in enumerate(zip(images, labels)):
      plots.attention_gif(
          image,
          attention_BxTxN[i].reshape(-1, *grid),
          tracked['top_probs_BxTxA'][i],
          tracked['top_classes_BxTxA'][i],
          tracked['certainty_BxT'][i],
          os.path.join(plot_dir, f'attention_{step:07d}_{i}.gif'),
          label=label,
          title=f'step {step}, eval image {i}: ',
      )

  return write


def _initial_state(config, model, run: Setup, checkpointer, train_iterator):
  """Resume order: latest in workdir -> config.init_from -> fresh init.

  The state is created or restored directly in its shardings: no device holds
  more of it than the mesh assigns.
  """
  latest = checkpointer.latest_step()
  if latest is not None:
    logging.info('Resuming from %s/%d', checkpointer.directory, latest)
    return checkpointer.restore(latest, run.abstract_state, train_iterator), 'resumed'
  state = run.init()
  if config.init_from:
    imported_model, variables, _ = torch_interop.load_imported(config.init_from)
    # Compute options (dtype, remat, unroll) do not change the weights.
    compute = dict(dtype=model.dtype, remat=model.remat, unroll=model.unroll)
    if imported_model.clone(**compute) != model:
      raise ValueError(
          f'config.init_from={config.init_from!r}: the imported model differs from config.model '
          f'(imported {imported_model}, configured {model})'
      )
    state = state.replace(
        params=variables['params'],
        opt_state=run.tx.init(variables['params']),
        batch_stats=variables.get('batch_stats', {}),
        synch=variables['synch'],
    )
    return jax.device_put(state, run.state_shardings), f'initialised from {config.init_from}'
  return state, 'fresh'


def train_and_evaluate(config, workdir: str):
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the state.

  Every process of a multi-host run calls this with the same arguments.
  """
  started = time.perf_counter()
  task, model = validation.validate(config)
  task.check_data(config)  # before anything is written or compiled
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    return _train_and_evaluate(config, workdir, task, model, mesh, started)


def _train_and_evaluate(config, workdir, task, model, mesh, started):
  is_chief = jax.process_index() == 0
  workdir = _prepare_workdir(workdir)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints)
  try:  # until the loop's own cleanup takes over
    resuming = checkpointer.latest_step() is not None
    config_path = checkpoint_lib.write_or_check_config(workdir, config, resuming)

    run = setup(config, model, task, mesh)
    train_loader = pipeline.make_train_loader(
        task.train_source(config),
        batch_size=config.batch_size // jax.process_count(),  # per host
        seed=config.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        worker_count=config.num_workers_train,
        read_options=grain.ReadOptions(num_threads=config.num_read_threads),
        transform=task.train_transform(config),
    )
    train_iterator = iter(train_loader)
    state, how = _initial_state(config, model, run, checkpointer, train_iterator)
    start = int(state.step)
    total = config.training_iterations
    eval_source = task.eval_source(config)
    # Kept on the host and sent per eval: ImageNet's 25 batches of 512 would
    # otherwise hold GiBs of accelerator memory for the whole run.
    eval_batches = pipeline.make_eval_batches(
        eval_source,
        batch_size=config.batch_size_test // jax.process_count(),  # per host
        num_batches=config.n_test_batches,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        read_options=grain.ReadOptions(num_threads=config.num_read_threads),
    )
    train_step, eval_step = run.train_step, run.eval_step
    plot_dir = os.path.join(workdir, 'plots')
    write_gifs = _attention_gifs(config, task, model, run, eval_source, plot_dir)
  except BaseException:
    checkpointer.close()
    raise
  writer = writers.MetricWriter(workdir, resume_step=start)
  if is_chief:
    os.makedirs(plot_dir, exist_ok=True)
  logging.info(
      'Run %s (%s at step %d) on mesh %s, process %d of %d. Workdir %s: config %s, '
      'checkpoints %s, metrics %s, TensorBoard %s, plots %s',
      config.task,
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

  def evaluate(step):
    sums, per_batch = None, []
    for batch in eval_batches:
      batch_sums, per_example = eval_step(state, sharding.global_batch(batch, mesh))
      sums = _add(sums, batch_sums)
      per_batch.append(per_example)
    sums, per_batch = jax.device_get((sums, per_batch))
    per_example = evaluation.concatenate(per_batch)
    scalars = {'eval/loss': float(sums['loss_sum']) / float(sums['count'])}
    # Over the whole eval set: top-1/top-5, calibration, adaptive compute (the paper's tables).
    whole_set, adaptive = evaluation.summarise(per_example, 'eval')
    scalars.update(whole_set)
    certainty_T = per_example['certainty_BxT'].mean(axis=0)
    scalars['eval/certainty_last'] = float(certainty_T[-1])
    # Wall time of this process so far, compile included (time-to-accuracy).
    scalars['eval/elapsed_s'] = time.perf_counter() - started
    writer.write(step, scalars)
    path = os.path.join(plot_dir, f'eval_ticks_{step:07d}.png')
    logging.info(
        'eval step %d: adaptive compute (stop at the first tick this certain):\n%s',
        step,
        metrics_lib.format_adaptive_table(adaptive),
    )
    if is_chief:
      plots.plot_ticks(
          per_example['correct_BxT'].mean(axis=0),
          certainty_T,
          path,
          title=f'{config.task}: eval at step {step}',
      )
      adaptive_path = os.path.join(plot_dir, f'adaptive_compute_{step:07d}')
      with open(adaptive_path + '.json', 'w') as f:
        json.dump({'step': step, **adaptive}, f, indent=1)
      plots.plot_adaptive_compute(
          adaptive,
          adaptive_path + '.png',
          title=f'{config.task}: adaptive compute at step {step}',
      )
    if write_gifs is not None:
      write_gifs(state, step)  # every process: the tracked step is one SPMD program
    logging.info(
        'eval step %d: loss %.4f, acc most-certain %.4f, last tick %.4f (plot %s)',
        step,
        scalars['eval/loss'],
        scalars['eval/acc_most_certain'],
        scalars['eval/acc_last'],
        path,
    )
    return scalars

  window = {'sums': None, 'grad_norm': 0.0, 'steps': 0, 'start': time.perf_counter()}
  progress = tqdm.tqdm(
      total=total, initial=start, unit='step', dynamic_ncols=True, disable=not is_chief
  )

  def consume(step, metrics, flush=False):
    """Host side of step `step`, one step late: check, accumulate, log.

    Returns whether some process asked to stop before the step (multi-process).
    """
    metrics = jax.device_get(metrics)
    if not metrics['finite']:
      bad = {k: float(metrics[k]) for k in ('loss', 'grad_norm')}
      raise NonFiniteError(
          f'non-finite training metrics at step {step + 1}: {bad}; the state was not '
          f'updated and the last good checkpoint in {checkpointer.directory} is intact'
      )
    window['sums'] = _add(
        window['sums'], {k: metrics[k] for k in metrics if k.endswith('sum') or k == 'count'}
    )
    window['grad_norm'] += float(metrics['grad_norm'])
    window['steps'] += 1
    done = step + 1
    progress.update(1)
    if done % config.log_every == 0 or done == total or flush:
      elapsed = time.perf_counter() - window['start']
      scalars = _summarise(window['sums'], 'train')
      scalars.update(
          {
              'train/grad_norm': window['grad_norm'] / window['steps'],
              'train/lr': float(metrics['lr']),
              'train/steps_per_s': window['steps'] / max(elapsed, 1e-9),
          }
      )
      writer.write(done, scalars)
      progress.set_postfix(
          loss=f"{scalars['train/loss']:.4f}",
          acc=f"{scalars['train/acc_most_certain']:.3f}",
          refresh=False,
      )
      window.update(sums=None, grad_norm=0.0, steps=0, start=time.perf_counter())
    return bool(metrics.get(STOP_KEY, False))

  # One process acts on its own signal at once; several agree through the steps'
  # metrics (a step or two later), so that every one saves the same step.
  agree = jax.process_count() > 1
  pending = None
  try:
    with _StopRequest() as stop:
      for step in range(start, total):
        local = next(train_iterator)
        if agree:
          rows = len(jax.tree.leaves(local)[0])
          local[STOP_KEY] = np.full((rows,), stop.signal is not None)
        state, metrics = train_step(state, sharding.global_batch(local, mesh))
        stopping = None
        if pending is not None and consume(*pending):
          stopping = stop.signal or 'a stop on another process'
        pending = (step, metrics)
        done = step + 1
        if not agree:
          stopping = stop.signal  # read once: a later signal is handled at the next step
        must_save = done % config.save_every == 0 or done == total or stopping
        if must_save or done % config.track_every == 0:
          # A checkpoint or an eval never follows an unchecked step; a stop logs its window.
          if consume(*pending, flush=bool(stopping)) and not stopping:
            stopping = stop.signal or 'a stop on another process'
          must_save = must_save or stopping
          pending = None
        if done % config.track_every == 0 or done == total:
          evaluate(done)
        if must_save:
          checkpointer.save(done, state, train_iterator)
        if stopping:
          logging.info('%s: checkpointed step %d, exiting', stopping, done)
          break
      if pending is not None:
        consume(*pending)
  finally:
    progress.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  return state
