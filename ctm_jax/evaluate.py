"""Evaluate a trained run without training: the task's evaluators on its held-out set.

  python -m ctm_jax.evaluate --workdir=RUN [--step=N] [--out=DIR]
  python -m ctm_jax.evaluate --workdir=hf://ORG/NAME --config=configs/<task>.py[:variant] --out=DIR

RUN is a training run or an artefact exported from one (python -m
ctm_jax.export), whose model.json carries the run's config. This restores the
run's checkpoint (the newest, or `--step`) or the artefact's variables on the run's mesh and
runs the same evaluators as a training eval: the scalars (printed, and written
to DIR/metrics.json) and the plots (tick accuracy, adaptive compute, the
task's gifs) under DIR/plots. DIR defaults to RUN/eval_<step>. Overrides of
the run's config (`--n_test_batches`, `--batch_size_test`) evaluate on more
or fewer held-out examples; `--evals` runs other evaluators of the task
(`--evals=tick_accuracy`; the task's `evals` names them).

An imported model (a Hub repo, a folder of the reference's Hub files, an
import workdir) carries no data or evaluation settings: `--config` gives
them, its model fields replaced by the import's kwargs (any that still differ,
e.g. a route length the task derives, are named in one line), and `--out`
says where the results go.
"""

import json
import time

import jax
import ml_collections
import numpy as np

from ctm_jax import artefact
from ctm_jax import checkpoint as checkpoint_lib
from ctm_jax import cli
from ctm_jax.interop import hub
from ctm_jax.interop import torch as torch_interop
from ctm_jax.models import ctm as ctm_lib
from ctm_jax import outputs
from ctm_jax import sharding
from ctm_jax import storage
from ctm_jax import supervised
from ctm_jax import validation


def evaluate(workdir: str, step: int | None = None, out: str = '', config=None, overwrite: bool = False,
             **overrides) -> dict:
  """The eval scalars of `workdir`'s checkpoint at `step` (default: the newest).

  `workdir` may instead be an imported model (hf://ORG/NAME, a folder of
  config.json + model.safetensors, an import workdir), which names no data:
  `config` (--config) then gives the task's data and evaluation, its model
  fields taken from the import's kwargs, and `out` is required. An `out`
  holding an earlier evaluation is replaced with `overwrite` (the run's own
  `eval_<step>` always), anything else never (ctm_jax/outputs.py).
  """
  started = time.perf_counter()
  imported = _is_import(workdir)
  if imported:
    config, step = _config_for_import(workdir, config, out), 0
  elif config is not None:
    raise validation.UsageError(
        f'--config: {workdir} is a training run, evaluated with its own config.json; '
        'leave --config out (--n_test_batches, --batch_size_test and --evals override it)'
    )
  else:
    workdir = storage.resolve(workdir)
  exported = not imported and artefact.is_artefact(workdir)
  if exported:
    spec = artefact.read_spec(workdir)
    if 'model_kwargs' in spec['config']:
      raise validation.UsageError(
          f'--workdir={workdir}: exported from an imported reference model, whose config names no '
          'held-out data; evaluate the import itself with --config=configs/<task>.py[:variant]'
      )
    if step is not None:
      raise validation.UsageError(f'--step={step}: an artefact holds one step; leave --step out')
    config = ml_collections.ConfigDict(spec['config'])
    step = (spec.get('source') or {}).get('step') or 0
  elif not imported:
    config = checkpoint_lib.read_config(workdir)
    asked = step
    # The newest step whose files match its manifest; restored below.
    step, _ = checkpoint_lib.restore_intact(workdir, asked, lambda s: None)
  config.update({k: v for k, v in overrides.items() if v is not None})
  task = validation.validate(config)
  model = task.make_model(config)
  validation.supervised_only(task, workdir)
  task.check_data(config)
  eval_source = task.eval_source(config)
  out, own_out = (out, False) if out else (storage.join(workdir, f'eval_{step}'), True)
  out = storage.resolve(out, '--out')
  outputs.claim(out, 'eval', overwrite or own_out)  # before compiling: refused at once
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    run = supervised.setup(config, model, task, mesh)
    if imported:  # validate() checked the import builds config's model
      _, variables, _ = torch_interop.load_imported(workdir, config.task)
      state = _state_from_variables(variables, run.abstract_state)
    elif exported:
      variables = artefact.restore_checked(workdir)
      state = _state_from_variables(variables, run.abstract_state)
    else:
      checkpointer = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints)

      def restore(s):
        checkpointer.manager.reload()  # a running trainer may have saved or rotated meanwhile
        return checkpointer.restore_state(s, run.abstract_state)

      try:
        restored, state = checkpoint_lib.restore_intact(workdir, asked, restore, verified=step)
      finally:
        checkpointer.close()
      if restored != step:  # damaged or rotated away since chosen: the scalars name the step used
        step = restored
        if own_out:
          out = storage.resolve(storage.join(workdir, f'eval_{step}'), '--out')
    chief = jax.process_index() == 0
    # Written beside `out` and swapped in whole: two evaluations of one step never mix.
    with outputs.building(out, 'eval', overwrite or own_out, writes=chief) as folder:
      plot_dir = storage.join(folder, 'plots')
      if chief:
        storage.path(plot_dir).mkdir(parents=True, exist_ok=True)
      context = supervised.make_context(config, task, model, run, eval_source, plot_dir, started)
      scalars = {'step': step}
      for evaluator in task.evaluators(config, context):
        scalars.update(evaluator.run(state, step))
      if chief:  # last: marks the evaluation complete
        storage.write_text(storage.join(folder, 'metrics.json'), json.dumps(scalars, indent=1, sort_keys=True))
  return scalars


def _is_import(workdir: str) -> bool:
  """Whether `workdir` is an imported model rather than a run or an artefact."""
  return hub.is_model_folder_or_file(workdir) or storage.path(
      storage.join(workdir, torch_interop.CHECKPOINT_DIR)
  ).is_dir()


def _config_for_import(workdir: str, config, out: str):
  """--config for an imported model: its data and evaluation as given, its
  model fields (and model type) those of the import, which init_from names
  for validate() to check against the model the config builds."""
  if config is None:
    raise validation.UsageError(
        f'--workdir={workdir}: an imported model, whose kwargs name no held-out data; name the '
        'task\'s data with --config=configs/<task>.py[:variant] (and its --config.<key> overrides)'
    )
  if not out:
    raise validation.UsageError(f'--workdir={workdir}: an imported model; pass --out=DIR for the results')
  if hub.is_model_folder_or_file(workdir):
    kwargs, model_type = hub.read_kwargs(workdir), 'ctm'
  else:
    record = checkpoint_lib.read_config(workdir)
    kwargs, model_type = record.model_kwargs.to_dict(), record.get('model_type', 'ctm')
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked: --config may be locked
  for name, value in kwargs.items():
    if name in config.model and name not in ctm_lib.COMPUTE_FIELDS:
      config.model[name] = list(value) if isinstance(value, tuple) else value
  config.model_type = model_type
  config.init_from = workdir
  return config


def _state_from_variables(variables, abstract_state):
  """A train state on the run's shardings with `variables`; the optimiser
  state, step and rng (which no evaluator reads) are zeros."""

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
      values.config,
      n_test_batches=values.n_test_batches,
      batch_size_test=values.batch_size_test,
      evals=values.evals,
      overwrite=values.overwrite,
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
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string(
      'workdir', None, 'A training run, an artefact exported from one, or an imported model '
      '(hf://ORG/NAME, a model folder, an import workdir; with --config and --out).', required=True)
  config = config_flags.DEFINE_config_file(
      'config', None, "An imported model's task data and evaluation: configs/<task>.py[:variant]; "
      '--config.<key>=VALUE overrides.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
  flags.DEFINE_string('out', '', 'Output directory (default <workdir>/eval_<step>).')
  flags.DEFINE_bool('overwrite', False, 'Replace an evaluation already at --out.')
  flags.DEFINE_integer('n_test_batches', None, "Held-out batches (default: the run's).")
  flags.DEFINE_integer('batch_size_test', None, "Held-out batch size (default: the run's).")
  flags.DEFINE_string('evals', None, "Evaluators by name, comma-separated (default: the run's config.evals).")
  app.run(validation.command('ctm_jax.evaluate', _run), flags_parser=cli.flags_parser('ctm_jax.evaluate', config))


if __name__ == '__main__':
  run()
