"""`config.init_from`: a trainer run starts from PyTorch weights imported by the CLI."""

import chex
import jax
import numpy as np
import pytest

from ctm_jax.configs import parity
from conftest import load_golden, state_dict
from ctm_jax import checkpoint as checkpoint_lib
from ctm_jax.interop import torch as torch_interop
from ctm_jax import sharding
from ctm_jax import train
from ctm_jax import validation
from interop_cli_test import reference_args, save_checkpoint

pytest.importorskip('torch')


def _imported_parity(tmp_path):
  arrays, meta = load_golden('parity')
  ckpt = tmp_path / 'reference.pt'
  save_checkpoint(
      ckpt, state_dict(arrays, meta), reference_args('parity', meta['constructor_kwargs'])
  )
  imported = tmp_path / 'imported'
  torch_interop.import_checkpoint(str(ckpt), str(imported))
  return meta['constructor_kwargs'], imported


def _config_for(kwargs, init_from):
  config = parity.get_config('smoke')
  config.parity_sequence_length = kwargs['prediction_reshaper'][0]
  model_keys = set(config.model)
  config.model.update({k: v for k, v in kwargs.items() if k in model_keys})
  config.init_from = str(init_from)
  return config


def test_init_from_imported_weights(tmp_path):
  kwargs, imported = _imported_parity(tmp_path)
  config = _config_for(kwargs, imported)
  task = validation.validate(config)
  model = task.make_model(config)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / 'run'), keep=1)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    program = task.training(config, model).program(mesh, str(tmp_path / 'plots'), 0.0)
    state, how = train._initial_state(config, program, checkpointer, same_model=True)
  checkpointer.close()
  assert how == f'initialised from {imported}'
  _, variables, _ = torch_interop.load_imported(str(imported))
  chex.assert_trees_all_equal(state.params, variables['params'])
  chex.assert_trees_all_equal(state.synch, variables['synch'])
  assert int(state.step) == 0


def test_init_from_rejects_a_different_model(tmp_path):
  kwargs, imported = _imported_parity(tmp_path)
  config = _config_for(kwargs, imported)
  config.model.d_model = kwargs['d_model'] * 2
  want = f"imported {kwargs['d_model']}, configured {kwargs['d_model'] * 2}"
  with pytest.raises(ValueError, match=rf'config\.init_from=.* in d_model \({want}\)$'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()  # refused before the workdir is made


def test_init_from_a_missing_import_is_named(tmp_path):
  kwargs, _ = _imported_parity(tmp_path)
  config = _config_for(kwargs, tmp_path / 'nowhere')
  with pytest.raises(ValueError, match=r'config\.init_from=.*nowhere.*no training run or imported checkpoint there'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
