"""A trained model from a workdir, for analysis and inference.

Two kinds of workdir load: a training run's (`config.json` + `checkpoints/<step>/`)
and a PyTorch import's (`python -m ctm_jax.interop.torch`). Variables land on
the first local device.
"""

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from ctm_jax import checkpoint
from ctm_jax import tasks
from ctm_jax import validation
from ctm_jax.interop import torch as torch_interop


def _restore_on_one_device(path: str):
  """A PyTree checkpoint onto the first local device, whatever mesh wrote it."""
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  metadata = checkpointer.metadata(path).item_metadata.tree
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  return checkpointer.restore(path, abstract)


def load(workdir: str, step: int | None = None):
  """(model, variables, config) of a trained or imported workdir.

  `config` is the run's ConfigDict (for an import: task, model_kwargs and the
  reference's args); `step` picks a training checkpoint (default: the newest).
  Raises validation.UsageError naming the workdir when there is nothing to load.
  """
  workdir = os.path.abspath(workdir)
  config_path = os.path.join(workdir, checkpoint.CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise validation.UsageError(
        f'--workdir={workdir}: no {checkpoint.CONFIG_FILE} there (not a training run or an import)'
    )
  if os.path.isdir(os.path.join(workdir, torch_interop.CHECKPOINT_DIR)):
    model, variables, config = torch_interop.load_imported(workdir)
    return model, variables, ml_collections.ConfigDict(config)
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  directory = os.path.join(workdir, 'checkpoints')
  committed = checkpoint.committed_steps(directory)
  if step is None:
    if not committed:
      raise validation.UsageError(f'--workdir={workdir}: no committed checkpoint under {directory}')
    step = committed[-1]
  elif step not in committed:
    raise validation.UsageError(
        f'--step={step}: no such checkpoint under {directory} (committed: {committed})'
    )
  task = tasks.get(config.task)
  state = _restore_on_one_device(os.path.join(directory, str(step), 'state'))
  variables = {'params': state['params'], 'synch': state['synch']}
  if state.get('batch_stats'):
    variables['batch_stats'] = state['batch_stats']
  return task.make_model(config), variables, config
