"""train_and_evaluate: config -> data -> state -> jitted steps -> loop.

Dimension glossary: T ticks.
"""

import os
import signal
import time

from absl import logging
import grain
import jax
import numpy as np
import tqdm

from ctm_jax import checkpoint as checkpoint_lib
from ctm_jax import optim
from ctm_jax import steps
from ctm_jax import validation
from ctm_jax import writers
from ctm_jax.analysis import plots
from ctm_jax.data import pipeline
from ctm_jax.interop import torch as torch_interop


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
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f'--workdir={workdir}: cannot create it ({e.strerror})') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ValueError(f'--workdir={workdir}: not writable')
  return workdir


def _per_tick(sums: dict, key: str):
  """Mean over the counted examples of a per-tick sum, (T,)."""
  return np.asarray(sums[key]) / float(sums['count'])


def _summarise(sums: dict, prefix: str) -> dict:
  """Batch sums -> means, named `prefix/...`, with per-tick accuracies."""
  count = float(sums['count'])
  acc_T = _per_tick(sums, 'acc_tick_sum')
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


def _initial_state(config, model, task, tx, checkpointer, abstract_state, train_iterator):
  """Resume order: latest in workdir -> config.init_from -> fresh init."""
  latest = checkpointer.latest_step()
  if latest is not None:
    logging.info('Resuming from %s/%d', checkpointer.directory, latest)
    return checkpointer.restore(latest, abstract_state, train_iterator), 'resumed'
  rng = jax.random.key(config.seed)
  example = task.example_input(config)
  state = jax.jit(lambda r: steps.init_state(model, tx, r, example))(rng)
  if config.init_from:
    imported_model, variables, _ = torch_interop.load_imported(config.init_from)
    if imported_model != model:
      raise ValueError(
          f'config.init_from={config.init_from!r}: the imported model differs from config.model '
          f'(imported {imported_model}, configured {model})'
      )
    state = state.replace(
        params=variables['params'],
        opt_state=tx.init(variables['params']),
        batch_stats=variables.get('batch_stats', {}),
        synch=variables['synch'],
    )
    return state, f'initialised from {config.init_from}'
  return state, 'fresh'


def train_and_evaluate(config, workdir: str):
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the state."""
  started = time.perf_counter()
  task, model = validation.validate(config)
  workdir = _prepare_workdir(workdir)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints)
  try:  # until the loop's own cleanup takes over
    resuming = checkpointer.latest_step() is not None
    config_path = checkpoint_lib.write_or_check_config(workdir, config, resuming)

    schedule = optim.make_schedule(config)
    tx = optim.make_optimizer(config, schedule)
    example = task.example_input(config)
    abstract_state = jax.eval_shape(
        lambda: steps.init_state(model, tx, jax.random.key(config.seed), example)
    )
    train_loader = pipeline.make_train_loader(
        task.train_source(config),
        batch_size=config.batch_size // jax.process_count(),  # per host
        seed=config.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        worker_count=config.num_workers_train,
        read_options=grain.ReadOptions(num_threads=config.num_read_threads),
    )
    train_iterator = iter(train_loader)
    state, how = _initial_state(
        config, model, task, tx, checkpointer, abstract_state, train_iterator
    )
    start = int(state.step)
    total = config.training_iterations
    eval_batches = pipeline.make_eval_batches(
        task.eval_source(config),
        batch_size=config.batch_size_test,
        num_batches=config.n_test_batches,
    )

    train_step = jax.jit(
        steps.make_train_step(model, task, tx, schedule, config.use_most_certain), donate_argnums=0
    )
    eval_step = jax.jit(steps.make_eval_step(model, task, config.use_most_certain))
  except BaseException:
    checkpointer.close()
    raise
  writer = writers.MetricWriter(workdir, resume_step=start)
  plot_dir = os.path.join(workdir, 'plots')
  os.makedirs(plot_dir, exist_ok=True)
  logging.info(
      'Run %s (%s at step %d). Workdir %s: config %s, checkpoints %s, metrics %s, '
      'TensorBoard %s, plots %s',
      config.task,
      how,
      start,
      workdir,
      config_path,
      checkpointer.directory,
      writer.jsonl_path,
      writer.tensorboard_dir,
      plot_dir,
  )

  def evaluate(step):
    sums = None
    for batch in eval_batches:
      sums = _add(sums, eval_step(state, batch))
    sums = jax.device_get(sums)
    scalars = _summarise(sums, 'eval')
    certainty_T = _per_tick(sums, 'certainty_tick_sum')
    scalars['eval/certainty_last'] = float(certainty_T[-1])
    # Wall time of this process so far, compile included (time-to-accuracy).
    scalars['eval/elapsed_s'] = time.perf_counter() - started
    writer.write(step, scalars)
    path = plots.plot_ticks(
        _per_tick(sums, 'acc_tick_sum'),
        certainty_T,
        os.path.join(plot_dir, f'eval_ticks_{step:07d}.png'),
        title=f'{config.task}: eval at step {step}',
    )
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
      total=total, initial=start, unit='step', dynamic_ncols=True, disable=jax.process_index() != 0
  )

  def consume(step, metrics, flush=False):
    """Host side of step `step`, one step late: check, accumulate, log."""
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

  pending = None
  try:
    with _StopRequest() as stop:
      for step in range(start, total):
        batch = next(train_iterator)
        state, metrics = train_step(state, batch)
        if pending is not None:
          consume(*pending)
        pending = (step, metrics)
        done = step + 1
        stopping = stop.signal  # read once: a later signal is handled at the next step
        must_save = done % config.save_every == 0 or done == total or stopping
        if must_save or done % config.track_every == 0:
          # A checkpoint or an eval never follows an unchecked step; a stop logs its window.
          consume(*pending, flush=bool(stopping))
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
