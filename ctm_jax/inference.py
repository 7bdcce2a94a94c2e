"""A trained model from a workdir, for analysis and inference.

Three kinds of directory load: a training run's (`config.json` +
`checkpoints/<step>/`), a PyTorch import's (`python -m ctm_jax.interop.torch`)
and an exported artefact (`python -m ctm_jax.export`); and a reference model
the Hub mixin wrote, `hf://ORG/NAME[@REVISION]` or its folder
(`from_pretrained`, imported in memory). Variables land on the first local
device.
"""


import jax
import ml_collections
import numpy as np

from ctm_jax import artefact
from ctm_jax import checkpoint
from ctm_jax import storage
from ctm_jax import tasks
from ctm_jax import validation
from ctm_jax.interop import hub
from ctm_jax.interop import torch as torch_interop


def from_pretrained(name_or_path: str, task: str | None = None, model_kwargs: dict | None = None):
  """(model, variables, config) of a reference model on the Hub
  (`hf://ORG/NAME[@REVISION]`), in a folder of config.json +
  model.safetensors, or in a .safetensors (with `model_kwargs`), as
  `load` gives for a workdir; any workdir `load` takes loads too. The
  task comes from the kwargs unless `task` names it; `config` is the import
  record `python -m ctm_jax.interop.torch` would write."""
  if not hub.is_model_folder_or_file(name_or_path):
    return load(name_or_path)
  model, variables, record = torch_interop.load_imported(name_or_path, task)
  return model, variables, ml_collections.ConfigDict(record)


def load(workdir: str, step: int | None = None):
  """(model, variables, config) of a trained or imported workdir.

  `config` is the run's ConfigDict (for an import: task, model_kwargs and the
  reference's args); `step` picks a training checkpoint (default: the newest
  intact one: checkpoint.restore_intact). Raises validation.UsageError naming
  the workdir when there is nothing to load, or naming what is damaged.
  """
  model, variables, config, _ = load_step(workdir, step)
  return model, variables, config


def _check_shapes(model, variables, inputs_spec, spec_path: str) -> None:
  """ValueError (one line) when the model `spec_path` describes would not
  take `variables` (a model.json edited, or from another export)."""
  try:
    inputs = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct((1, *leaf['shape'][1:]), leaf['dtype']),
        inputs_spec, is_leaf=lambda x: isinstance(x, dict) and 'shape' in x,
    )
    wanted = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), inputs)
  except Exception as e:  # pylint: disable=broad-except  # whatever a bad spec makes flax raise
    raise ValueError(f'{spec_path}: its model does not build ({validation.first_line(e)[:200]}); '
                     're-export it with python -m ctm_jax.export') from None
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(wanted)}
  have = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(variables)}
  for name in sorted(set(want) | set(have)):
    if want.get(name) != have.get(name):
      raise ValueError(
          f'{spec_path}: its model_kwargs make {name} {want.get(name)}, the stored variables hold '
          f'{have.get(name)}; re-export it with python -m ctm_jax.export'
      )


def load_step(workdir: str, step: int | None = None):
  """load()'s (model, variables, config) and the training step restored (the
  artefact's source step; None for an import or a Hub model)."""
  if hub.is_model_folder_or_file(workdir):
    if step is not None:
      raise validation.UsageError(f'--step={step}: {workdir} is a reference model, one set of weights')
    return (*from_pretrained(workdir), None)
  workdir = storage.resolve(workdir)
  if artefact.is_artefact(workdir):
    if step is not None:
      raise validation.UsageError(f'--step={step}: an artefact holds one step; leave --step out')
    spec = artefact.read_spec(workdir)
    model = tasks.get(spec['task']).model_from_kwargs(spec.get('model_type', 'ctm'), spec['model_kwargs'])
    variables = artefact.restore_checked(workdir)
    _check_shapes(model, variables, spec['inputs'], storage.join(workdir, artefact.MODEL_FILE))
    return model, variables, ml_collections.ConfigDict(spec['config']), (spec.get('source') or {}).get('step')
  if not storage.path(storage.join(workdir, checkpoint.CONFIG_FILE)).is_file():
    raise validation.UsageError(
        f'--workdir={workdir}: no {checkpoint.CONFIG_FILE} there (not a training run or an import)'
    )
  config = checkpoint.read_config(workdir)
  validation.supervised_only(tasks.get(config.task), workdir)
  if storage.path(storage.join(workdir, torch_interop.CHECKPOINT_DIR)).is_dir():
    if step is not None:
      raise validation.UsageError(f'--step={step}: {workdir} is an import, one set of weights')
    model, variables, config = torch_interop.load_imported(workdir)
    return model, variables, ml_collections.ConfigDict(config), None
  directory = storage.join(workdir, 'checkpoints')
  step, variables = checkpoint.restore_intact(
      workdir, step,
      lambda s: artefact.restore_variables(storage.join(directory, str(s), 'state'), keys=('params', 'synch', 'batch_stats')),
  )
  if not variables.get('batch_stats'):
    variables.pop('batch_stats', None)
  return tasks.get(config.task).make_model(config), variables, config, step
