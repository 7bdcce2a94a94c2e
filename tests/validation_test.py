"""Whole-config validation names the offending field before anything runs."""

import pytest

from ctm_jax.configs import parity
from ctm_jax import train
from ctm_jax import validation


@pytest.mark.parametrize('variant', ['default', 'small', 'smoke'])
def test_shipped_variants_are_valid(variant):
  config = parity.get_config(variant)
  task = validation.validate(config)
  model = task.make_model(config)
  config = parity.get_config(variant)
  assert task.name == 'parity'
  assert model.out_dims == 2 * config.parity_sequence_length
  assert model.prediction_reshaper == (config.parity_sequence_length, 2)


BAD = [
    ('batch_size', 0, 'config.batch_size=0'),
    ('n_test_batches', -3, 'config.n_test_batches=-3'),
    ('lr', 0.0, 'config.lr=0.0'),
    ('scheduler_type', 'linear', "config.scheduler_type='linear'"),
    ('warmup_steps', 10**9, 'config.warmup_steps=1000000000'),
    ('gradient_clipping', 2.0, 'config.gradient_clipping=2.0'),
    ('gradient_clipping_type', 'value', "config.gradient_clipping_type='value'"),
    ('task', 'sudoku', "config.task='sudoku'"),
    ('lrr', 1, 'config.lrr=1'),
    ('model.d_input', 7, 'config.model.d_input=7'),
    ('model.backbone_type', 'resnet99-1', "config.model.backbone_type='resnet99-1'"),
    ('model.neuron_select_type', 'pairs', "config.model.neuron_select_type='pairs'"),
    ('model.backbone_remat', 'blocks', "config.model.backbone_remat='blocks'"),
]


@pytest.mark.parametrize('field,value,message', BAD)
def test_bad_value_names_the_field(field, value, message):
  config = parity.get_config('smoke')
  with config.unlocked():
    node, _, leaf = field.rpartition('.')
    target = config.model if node == 'model' else config
    target[leaf] = value
  with pytest.raises(ValueError) as info:
    validation.validate(config)
  assert message in str(info.value)


def test_missing_key_is_named():
  config = parity.get_config('smoke')
  del config['save_every']
  with pytest.raises(ValueError, match='config.save_every'):
    validation.validate(config)


def test_workdir_that_cannot_be_created_is_named(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(ValueError, match='--workdir=.*a_file/run'):
    train.train_and_evaluate(parity.get_config('smoke'), str(blocker / 'run'))
  assert blocker.read_text() == 'not a directory'
