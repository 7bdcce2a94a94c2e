"""A trained model from a workdir, for analysis and inference.

Three kinds of directory load: a training run's (`config.json` +
`checkpoints/<step>/`), a PyTorch import's (`python -m ctm_jax.interop.torch`)
and an exported artefact (`python -m ctm_jax.export`). Variables land on the
first local device.
"""

import os

import ml_collections

from ctm_jax import artefact
from ctm_jax import checkpoint
from ctm_jax import tasks
from ctm_jax import validation
from ctm_jax.interop import torch as torch_interop


def load(workdir: str, step: int | None = None):
  """(model, variables, config) of a trained or imported workdir.

  `config` is the run's ConfigDict (for an import: task, model_kwargs and the
  reference's args); `step` picks a training checkpoint (default: the newest).
  Raises validation.UsageError naming the workdir when there is nothing to load.
  """
  workdir = os.path.abspath(workdir)
  if artefact.is_artefact(workdir):
    spec = artefact.read_spec(workdir)
    model = tasks.get(spec['task']).model_from_kwargs(spec.get('model_type', 'ctm'), spec['model_kwargs'])
    variables = artefact.restore_variables(os.path.join(workdir, artefact.VARIABLES_DIR))
    return model, variables, ml_collections.ConfigDict(spec['config'])
  config_path = os.path.join(workdir, checkpoint.CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise validation.UsageError(
        f'--workdir={workdir}: no {checkpoint.CONFIG_FILE} there (not a training run or an import)'
    )
  config = checkpoint.read_config(workdir)
  validation.supervised_only(tasks.get(config.task), workdir)
  if os.path.isdir(os.path.join(workdir, torch_interop.CHECKPOINT_DIR)):
    model, variables, config = torch_interop.load_imported(workdir)
    return model, variables, ml_collections.ConfigDict(config)
  directory = os.path.join(workdir, 'checkpoints')
  step = checkpoint.choose_step(directory, step, workdir)
  variables = artefact.restore_variables(
      os.path.join(directory, str(step), 'state'), keys=('params', 'synch', 'batch_stats')
  )
  if not variables.get('batch_stats'):
    variables.pop('batch_stats', None)
  return tasks.get(config.task).make_model(config), variables, config
