"""Evaluate a trained run without training: the task's evaluators on its held-out set.

  python -m ctm_jax.evaluate --workdir=RUN [--step=N] [--out=DIR]

RUN is a training run or an artefact exported from one (python -m
ctm_jax.export), whose model.json carries the run's config. This restores the
run's checkpoint (the newest, or `--step`) or the artefact's variables on the run's mesh and
runs the same evaluators as a training eval: the scalars (printed, and written
to DIR/metrics.json) and the plots (tick accuracy, adaptive compute, the
task's gifs) under DIR/plots. DIR defaults to RUN/eval_<step>. Overrides of
the run's config (`--n_test_batches`, `--batch_size_test`) evaluate on more
or fewer held-out examples; `--evals` runs other evaluators of the task
(`--evals=tick_accuracy`; the task's `evals` names them).
"""

import json
import os
import time

import jax
import ml_collections
import numpy as np

from ctm_jax import artefact
from ctm_jax import checkpoint as checkpoint_lib
from ctm_jax.interop import hub
from ctm_jax import sharding
from ctm_jax import supervised
from ctm_jax import validation


def evaluate(workdir: str, step: int | None = None, out: str = '', **overrides) -> dict:
  """The eval scalars of `workdir`'s checkpoint at `step` (default: the newest)."""
  started = time.perf_counter()
  if hub.is_model_folder_or_file(workdir):
    raise validation.UsageError(
        f'--workdir={workdir}: a reference model, whose kwargs name no held-out data; fine-tune '
        'or evaluate it in a run: --config.init_from=' + workdir
    )
  workdir = os.path.abspath(workdir)
  exported = artefact.is_artefact(workdir)
  if exported:
    spec = artefact.read_spec(workdir)
    if 'model_kwargs' in spec['config']:
      raise validation.UsageError(
          f'--workdir={workdir}: exported from an imported reference model, whose config names no '
          'held-out data; evaluate a training run or an artefact exported from one'
      )
    if step is not None:
      raise validation.UsageError(f'--step={step}: an artefact holds one step; leave --step out')
    config = ml_collections.ConfigDict(spec['config'])
    step = (spec.get('source') or {}).get('step') or 0
  else:
    config = checkpoint_lib.read_config(workdir)
    step = checkpoint_lib.choose_step(os.path.join(workdir, 'checkpoints'), step, workdir)
  config.update({k: v for k, v in overrides.items() if v is not None})
  task = validation.validate(config)
  model = task.make_model(config)
  validation.supervised_only(task, workdir)
  task.check_data(config)
  eval_source = task.eval_source(config)
  out = os.path.abspath(out or os.path.join(workdir, f'eval_{step}'))
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    run = supervised.setup(config, model, task, mesh)
    if exported:
      state = _state_from_artefact(workdir, run.abstract_state)
    else:
      checkpointer = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints)
      try:
        state = checkpointer.restore_state(step, run.abstract_state)
      finally:
        checkpointer.close()
    plot_dir = os.path.join(out, 'plots')
    if jax.process_index() == 0:
      os.makedirs(plot_dir, exist_ok=True)
    context = supervised.make_context(config, task, model, run, eval_source, plot_dir, started)
    scalars = {'step': step}
    for evaluator in task.evaluators(config, context):
      scalars.update(evaluator.run(state, step))
  if jax.process_index() == 0:
    with open(os.path.join(out, 'metrics.json'), 'w') as f:
      json.dump(scalars, f, indent=1, sort_keys=True)
  return scalars


def _state_from_artefact(directory: str, abstract_state):
  """A train state on the run's shardings with the artefact's variables; the
  optimiser state, step and rng (which no evaluator reads) are zeros."""
  variables = artefact.restore_variables(os.path.join(directory, artefact.VARIABLES_DIR))

  def put(value, abstract):
    return jax.device_put(np.asarray(value, abstract.dtype), abstract.sharding)

  def zeros(abstract):
    return put(np.zeros(abstract.shape, abstract.dtype), abstract)

  state = jax.tree.map(zeros, abstract_state)
  return state.replace(
      params=jax.tree.map(put, variables['params'], abstract_state.params),
      synch=jax.tree.map(put, variables.get('synch', {}), abstract_state.synch),
      batch_stats=jax.tree.map(put, variables.get('batch_stats', {}), abstract_state.batch_stats),
  )


def _run(values):
  scalars = evaluate(
      values.workdir,
      values.step,
      values.out,
      n_test_batches=values.n_test_batches,
      batch_size_test=values.batch_size_test,
      evals=values.evals,
  )
  for key in sorted(scalars):
    if '_tick_' not in key:
      value = scalars[key]
      print(f'{key:40s} {value:.4f}' if isinstance(value, float) else f'{key:40s} {value}')


def run():
  """`ctm-evaluate`, the same as `python -m ctm_jax.evaluate`; flags are defined here, so
  importing this module adds none."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string('workdir', None, 'A training run, or an artefact exported from one.', required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
  flags.DEFINE_string('out', '', 'Output directory (default <workdir>/eval_<step>).')
  flags.DEFINE_integer('n_test_batches', None, "Held-out batches (default: the run's).")
  flags.DEFINE_integer('batch_size_test', None, "Held-out batch size (default: the run's).")
  flags.DEFINE_string('evals', None, "Evaluators by name, comma-separated (default: the run's config.evals).")
  app.run(validation.command('ctm_jax.evaluate', _run))


if __name__ == '__main__':
  run()
