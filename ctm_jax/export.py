"""Export a trained (or imported) model as a self-contained inference artefact.

  python -m ctm_jax.export --workdir=RUN [--step=N] --out=DIR [--input_shape=H,W,C]

writes DIR (layout in ctm_jax/artefact.py): the model's variables without
optimiser state, the model config and the inputs' spec, and the forward pass
serialised with `jax.export` for any batch size. Load it back with
`ctm_jax.inference.load(DIR)` (a flax model and its variables) or
`ctm_jax.artefact.load_program(DIR)` (the serialised program: no model code).
`--input_shape` (one example's shape) is needed only for an imported
reference model, whose config does not say what it reads.

  python -m ctm_jax.export --workdir=RUN --format=hf --out=DIR [--push_to_hub=ORG/NAME]

writes DIR as the reference's Hub mixin writes a model (config.json,
model.safetensors) with a model card (README.md): the PyTorch reference
loads it (`ContinuousThoughtMachine(**config)`, `safetensors.torch.load_model`)
and `ctm_jax.from_pretrained(DIR)` reads it back exactly; `--push_to_hub`
uploads it with huggingface_hub (the hub extra).
"""

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from ctm_jax import artefact
from ctm_jax import checkpoint
from ctm_jax import inference
from ctm_jax.interop import hub
from ctm_jax import manifest
from ctm_jax.interop import torch as torch_interop
from ctm_jax.models import ctm as ctm_lib
from ctm_jax import outputs
from ctm_jax import storage
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


def export_hf(workdir: str, out: str, step: int | None = None, overwrite=False, push_to_hub: str = '') -> dict:
  """Writes `workdir`'s model in the reference's Hub format (interop/hub.py);
  returns {file: bytes}, and the repo's 'url' when pushed."""
  if storage.is_url(out):
    raise validation.UsageError(
        f'--out={out}: --format=hf writes a local folder; write it here and push it with '
        '--push_to_hub=ORG/NAME, or copy it to the bucket'
    )
  out = os.path.abspath(out)
  outputs.claim(out, 'hub_model', overwrite)
  model, variables, config, step = inference.load_step(workdir, step)
  if not isinstance(model, ctm_lib.ContinuousThoughtMachine):
    raise validation.UsageError(
        f'--format=hf: the reference\'s Hub format holds a ContinuousThoughtMachine; '
        f'{workdir} holds a {type(model).__name__}'
    )
  kwargs = _jsonable({k: v for k, v in _model_kwargs(model).items() if k not in ctm_lib.COMPUTE_FIELDS})
  state_dict = torch_interop.to_state_dict(variables, model)
  card = _model_card(workdir, model, kwargs, config, step)
  written = hub.write_model(out, kwargs, state_dict, card, overwrite)
  if push_to_hub:
    written['url'] = hub.push(out, push_to_hub)
  return written


def _model_card(workdir, model, kwargs, config, step) -> str:
  """README.md of an exported Hub model: task, source, config, metrics, how to load it."""
  metrics = {}
  records = storage.path(storage.join(workdir, 'metrics.jsonl')) if not hub.is_hub(workdir) else None
  if records is not None and records.is_file():
    with records.open() as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a killed run
          continue
        if isinstance(record, dict) and any(k.startswith('eval/') for k in record) and (step is None or record.get('step') == step):
          metrics = {k: v for k, v in record.items() if k == 'step' or (k.startswith('eval/') and '_tick_' not in k)}
  lines = [
      '---', 'library_name: ctm-jax', 'license: apache-2.0',
      'tags:', '- continuous-thought-machine', '- ctm-jax', '---', '',
      f'# Continuous Thought Machine: {config.task}', '',
      f'Exported by ctm-jax from `{workdir}`' + (f' (step {metrics["step"]})' if 'step' in metrics else '')
      + f' as a `{type(model).__name__}`, in the format of the reference\'s Hub mixin '
      '(`config.json`: the constructor\'s kwargs; `model.safetensors`: its state_dict).', '',
      '## Config', '', '```json', json.dumps(kwargs, indent=1), '```', '',
  ]
  if metrics:
    lines += ['## Held-out metrics', '', '| metric | value |', '|---|---|']
    lines += [f'| {k} | {v:.4f} |' if isinstance(v, float) else f'| {k} | {v} |' for k, v in sorted(metrics.items())]
    lines += ['']
  lines += [
      '## Load it', '', 'JAX (ctm-jax, `pip install "ctm-jax[hub]"`):', '',
      '```python', 'import ctm_jax', "model, variables, config = ctm_jax.from_pretrained('hf://ORG/NAME')  # or this folder",
      '```', '',
      "PyTorch ([the reference](https://github.com/SakanaAI/continuous-thought-machines)): build the model "
      'from `config.json`, run one forward to materialise its lazy layers, then load the weights:', '',
      '```python', 'import json, safetensors.torch',
      'from models.ctm import ContinuousThoughtMachine',
      "model = ContinuousThoughtMachine(**json.load(open('config.json')))",
      'model(example_input)  # one batch of the inputs it reads',
      "safetensors.torch.load_model(model, 'model.safetensors', strict=True)", 'model.eval()', '```', '',
  ]
  return '\n'.join(lines)


def export(workdir: str, out: str, step: int | None = None, input_shape=None, overwrite=False) -> dict:
  """Writes the artefact; returns its model.json contents (with sizes in bytes)."""
  out = storage.resolve(out, '--out')
  outputs.claim(out, 'artefact', overwrite)
  model, variables, config, step = inference.load_step(workdir, step)
  if hub.is_hub(workdir):  # a Hub model: one set of weights, no training step
    source = {'workdir': workdir, 'step': None}
  else:
    source = {'workdir': storage.resolve(workdir), 'step': step}
  return write(model, variables, config, out, input_shape, source, overwrite)


def write(model, variables, config, out: str, input_shape=None, source=None, overwrite=False) -> dict:
  """The artefact of `model` with `variables` under `config` (a training run's
  config, or an import's) at `out`, replaced whole. On disk it is written
  beside `out` and moved into place; a bucket has no rename, so there
  model.json goes last: until it is there, `out` is not an artefact. Only
  an artefact at `out` is replaced, with `overwrite` (ctm_jax/outputs.py)."""
  out = storage.resolve(out, '--out')
  outputs.claim(out, 'artefact', overwrite)  # before the export: refused at once
  task = tasks.get(config.task)
  example = _example_inputs(task, config, input_shape)
  (batch,) = jax.export.symbolic_shape('batch')
  abstract_inputs = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((batch, *np.shape(x)[1:]), np.asarray(x).dtype), example
  )
  abstract_variables = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
  exported = jax.export.export(jax.jit(forward_fn(model)))(abstract_variables, abstract_inputs)
  program = exported.serialize()

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
  spec_text = json.dumps(spec, indent=1)
  with outputs.building(out, 'artefact', overwrite) as tmp:  # a complete artefact or none
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(storage.join(tmp, artefact.VARIABLES_DIR), variables)
    checkpointer.wait_until_finished()
    storage.write_bytes(storage.join(tmp, artefact.PROGRAM_FILE), program)
    # The manifest before model.json (which marks the artefact complete), model.json's sum included.
    sums = manifest.file_sums(tmp, read=True)
    sums[artefact.MODEL_FILE] = manifest.sum_of(spec_text.encode())
    manifest.write(tmp, sums)
    storage.write_text(storage.join(tmp, artefact.MODEL_FILE), spec_text)
  spec['bytes'] = storage.size(out)
  return spec


def checkpoint_bytes(workdir: str, step: int | None = None) -> int:
  """The size of one training checkpoint (the newest, or `step`) of a run; 0 if none."""
  workdir = storage.resolve(workdir)
  directory = storage.join(workdir, 'checkpoints')
  try:
    step = checkpoint.choose_step(directory, step, workdir)
  except validation.UsageError:  # an import: no training checkpoint to compare with
    return 0
  return storage.size(storage.join(directory, str(step)))


def _run(values):
  shape = None
  if values.input_shape:
    try:
      shape = tuple(int(v) for v in values.input_shape.split(','))
    except ValueError:
      raise validation.UsageError(
          f'--input_shape={values.input_shape!r}: comma-separated integers, e.g. 224,224,3'
      ) from None
  if values.format == 'hf':
    if values.input_shape:
      raise validation.UsageError('--input_shape: the Hub format holds no program; leave it out')
    written = export_hf(values.workdir, values.out, values.step, values.overwrite, values.push_to_hub)
    print(f'exported to {os.path.abspath(values.out)} in the Hub format: '
          + ', '.join(f'{k} {v / 1e6:.2f} MB' for k, v in written.items() if k != 'url'))
    if 'url' in written:
      print(f'pushed to {written["url"]}')
    return
  if values.push_to_hub:
    raise validation.UsageError('--push_to_hub: only with --format=hf')
  spec = export(values.workdir, values.out, values.step, shape, values.overwrite)
  trained = 0 if hub.is_hub(values.workdir) else checkpoint_bytes(values.workdir, values.step)
  print(
      f'exported {spec["task"]} model to {storage.resolve(values.out, "--out")}: {spec["bytes"] / 1e6:.2f} MB'
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
  flags.DEFINE_enum('format', 'jax', ['jax', 'hf'],
                    "jax: our artefact (variables + the serialised program); hf: the reference's Hub "
                    'format (config.json + model.safetensors + model card).')
  flags.DEFINE_string('push_to_hub', '', 'With --format=hf: upload to this Hub model repo, ORG/NAME.')
  app.run(validation.command('ctm_jax.export', _run))


if __name__ == '__main__':
  run()
