"""Export a trained (or imported) model as a self-contained inference artefact.

  python -m ctm_jax.export --workdir=RUN [--step=N] --out=DIR [--input_shape=H,W,C]

writes DIR (layout in ctm_jax/artefact.py): the model's variables without
optimiser state, the model config and the inputs' spec, and the forward pass
serialised with `jax.export` for any batch size. Load it back with
`ctm_jax.inference.load(DIR)` (a flax model and its variables) or
`ctm_jax.artefact.load_program(DIR)` (the serialised program: no model code).
`--input_shape` (one example's shape) is needed only for an imported
reference model, whose config does not say what it reads.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from ctm_jax import artefact
from ctm_jax import checkpoint
from ctm_jax import inference
from ctm_jax.interop import hub
from ctm_jax import tasks
from ctm_jax import validation


def forward_fn(model):
  """(variables, inputs) -> {'predictions', 'certainties'}: what the artefact serves."""

  def forward(variables, inputs):
    output = model.apply(variables, inputs)
    return {'predictions': output.predictions, 'certainties': output.certainties}

  return forward


def _example_inputs(task, config, input_shape):
  """A batch of one of what `model.apply` reads."""
  if input_shape:
    return np.ones((1, *input_shape), np.float32)
  if 'model_kwargs' in config:  # an import: its args do not say what the model reads
    raise validation.UsageError(
        '--input_shape is needed for an imported model (one example\'s shape, e.g. 224,224,3)'
    )
  return task.model_inputs(task.example_batch(config))


def _model_kwargs(model) -> dict:
  """The constructor kwargs `model` was built with."""
  return {
      f.name: getattr(model, f.name)
      for f in dataclasses.fields(model)
      if f.init and f.name not in ('parent', 'name')
  }


def _jsonable(value):
  return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, 'tolist') else str(v)))


def export(workdir: str, out: str, step: int | None = None, input_shape=None, overwrite=False) -> dict:
  """Writes the artefact; returns its model.json contents (with sizes in bytes)."""
  out = os.path.abspath(out)
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise validation.UsageError(f'--out={out} exists and is not empty; pass --overwrite to replace it')
  model, variables, config = inference.load(workdir, step)
  if hub.is_hub(workdir):  # a Hub model: one set of weights, no training step
    return write(model, variables, config, out, input_shape, {'workdir': workdir, 'step': None})
  source = {'workdir': os.path.abspath(workdir), 'step': _checkpoint_step(workdir, step)}
  return write(model, variables, config, out, input_shape, source)


def write(model, variables, config, out: str, input_shape=None, source=None) -> dict:
  """The artefact of `model` with `variables` under `config` (a training run's
  config, or an import's) at `out`, replaced whole."""
  out = os.path.abspath(out)
  task = tasks.get(config.task)
  example = _example_inputs(task, config, input_shape)
  (batch,) = jax.export.symbolic_shape('batch')
  abstract_inputs = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((batch, *np.shape(x)[1:]), np.asarray(x).dtype), example
  )
  abstract_variables = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
  exported = jax.export.export(jax.jit(forward_fn(model)))(abstract_variables, abstract_inputs)
  program = exported.serialize()

  tmp = out + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(tmp, artefact.VARIABLES_DIR), variables)
  checkpointer.wait_until_finished()
  with open(os.path.join(tmp, artefact.PROGRAM_FILE), 'wb') as f:
    f.write(program)
  spec = {
      'format': artefact.FORMAT,
      'task': config.task,
      'model_type': config.get('model_type', 'ctm'),
      'model_kwargs': _jsonable(_model_kwargs(model)),
      'inputs': jax.tree.map(
          lambda s: {'shape': [None, *s.shape[1:]], 'dtype': str(s.dtype)}, abstract_inputs
      ),
      'outputs': {
          'predictions': 'float32 (batch, out_dims, ticks)',
          'certainties': 'float32 (batch, 2, ticks): [normalised entropy, 1 - it]',
      },
      'config': _jsonable(config.to_dict()),
      'source': source,
  }
  with open(os.path.join(tmp, artefact.MODEL_FILE), 'w') as f:
    json.dump(spec, f, indent=1)
  if os.path.exists(out):
    shutil.rmtree(out)
  os.replace(tmp, out)  # a complete artefact or none
  spec['bytes'] = _size(out)
  return spec


def _checkpoint_step(workdir: str, step: int | None) -> int | None:
  """The training step exported: `step`, or the newest; None for an import."""
  workdir = os.path.abspath(workdir)
  if artefact.is_artefact(workdir):
    return (artefact.read_spec(workdir).get('source') or {}).get('step')
  try:
    return checkpoint.choose_step(os.path.join(workdir, 'checkpoints'), step, workdir)
  except validation.UsageError:
    return None


def checkpoint_bytes(workdir: str, step: int | None = None) -> int:
  """The size of one training checkpoint (the newest, or `step`) of a run; 0 if none."""
  workdir = os.path.abspath(workdir)
  directory = os.path.join(workdir, 'checkpoints')
  try:
    step = checkpoint.choose_step(directory, step, workdir)
  except validation.UsageError:  # an import: no training checkpoint to compare with
    return 0
  return _size(os.path.join(directory, str(step)))


def _size(path: str) -> int:
  return sum(
      os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names
  )


def _run(values):
  shape = None
  if values.input_shape:
    try:
      shape = tuple(int(v) for v in values.input_shape.split(','))
    except ValueError:
      raise validation.UsageError(
          f'--input_shape={values.input_shape!r}: comma-separated integers, e.g. 224,224,3'
      ) from None
  spec = export(values.workdir, values.out, values.step, shape, values.overwrite)
  trained = 0 if hub.is_hub(values.workdir) else checkpoint_bytes(values.workdir, values.step)
  print(
      f'exported {spec["task"]} model to {os.path.abspath(values.out)}: {spec["bytes"] / 1e6:.2f} MB'
      + (f' (its training checkpoint: {trained / 1e6:.2f} MB)' if trained else '')
  )


def run():
  """`ctm-export`, the same as `python -m ctm_jax.export`; flags are defined here, so
  importing this module adds none."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string(
      'workdir', None, 'A training run, an imported reference model, or a Hub model (hf://ORG/NAME).',
      required=True,
  )
  flags.DEFINE_string('out', None, 'Directory to write the artefact to.', required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
  flags.DEFINE_string('input_shape', '', "One example's shape, for an imported model.")
  flags.DEFINE_bool('overwrite', False, 'Replace an existing artefact.')
  app.run(validation.command('ctm_jax.export', _run))


if __name__ == '__main__':
  run()
