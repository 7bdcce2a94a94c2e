"""A trained model from a workdir, for analysis and inference.

Three kinds of directory load: a training run's (`config.json` +
`checkpoints/<step>/`), a PyTorch import's (`python -m ctm_jax.interop.torch`)
and an exported artefact (`python -m ctm_jax.export`); and a reference model
the Hub mixin wrote, `hf://ORG/NAME[@REVISION]` or its folder
(`from_pretrained`, imported in memory). Variables land on the first local
device.
"""


import ml_collections

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
  reference's args); `step` picks a training checkpoint (default: the newest).
  Raises validation.UsageError naming the workdir when there is nothing to load.
  """
  if hub.is_model_folder_or_file(workdir):
    if step is not None:
      raise validation.UsageError(f'--step={step}: {workdir} is a reference model, one set of weights')
    return from_pretrained(workdir)
  workdir = storage.resolve(workdir)
  if artefact.is_artefact(workdir):
    spec = artefact.read_spec(workdir)
    model = tasks.get(spec['task']).model_from_kwargs(spec.get('model_type', 'ctm'), spec['model_kwargs'])
    variables = artefact.restore_variables(storage.join(workdir, artefact.VARIABLES_DIR))
    return model, variables, ml_collections.ConfigDict(spec['config'])
  if not storage.path(storage.join(workdir, checkpoint.CONFIG_FILE)).is_file():
    raise validation.UsageError(
        f'--workdir={workdir}: no {checkpoint.CONFIG_FILE} there (not a training run or an import)'
    )
  config = checkpoint.read_config(workdir)
  validation.supervised_only(tasks.get(config.task), workdir)
  if storage.path(storage.join(workdir, torch_interop.CHECKPOINT_DIR)).is_dir():
    model, variables, config = torch_interop.load_imported(workdir)
    return model, variables, ml_collections.ConfigDict(config)
  directory = storage.join(workdir, 'checkpoints')
  step = checkpoint.choose_step(directory, step, workdir)
  variables = artefact.restore_variables(
      storage.join(directory, str(step), 'state'), keys=('params', 'synch', 'batch_stats')
  )
  if not variables.get('batch_stats'):
    variables.pop('batch_stats', None)
  return tasks.get(config.task).make_model(config), variables, config
