"""Logical axes declared where parameters are created, mapped onto the mesh by
config.mesh.rules: the same shardings as the path-pattern table they replaced,
on every config; a renamed layer keeps its axes; bad rules are named."""

import importlib
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs_test import CASES
from ctm_jax import sharding
from ctm_jax import tasks
from ctm_jax import validation
from ctm_jax.models import nlm

# Each config's sharded parameters and their PartitionSpecs on two meshes, as
# the regex table (sharding._NEURON_RULES, removed) gave them at 3ef050b.
RECORDED = json.loads(
    (pathlib.Path(__file__).resolve().parent / 'data' / 'param_shardings.json').read_text()
)
MESHES = {'2x2x2': {'data': 2, 'fsdp': 2, 'neuron': 2}, '1x8x1': {'data': 1, 'fsdp': 8, 'neuron': 1}}


def _model_and_init(name, variant):
  config = importlib.import_module(f'ctm_jax.configs.{name}').get_config(variant)
  if name == 'imagenet':  # parameter shapes do not depend on the image size
    config.image_shape = (32, 32, 3)
  try:
    task = validation.validate(config, num_devices=8)
    model = task.make_model(config)
  except ValueError:  # an RL config whose minibatches fit no 8-way batch axis
    task = validation.validate(config, num_devices=1)
    model = task.make_model(config)
  if isinstance(task, tasks.Supervised):
    example = (task.model_inputs(task.example_batch(config)),)
  else:  # the agent takes (observation, carry, done)
    env = task.make_env(config)
    example = model.example_inputs(env.observation_shape, env.observation_dtype)
  return config, lambda: model.init(jax.random.key(0), *example)


def _specs(params, declared, fsdp, rules=sharding.DEFAULT_RULES):
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    axes = sharding.param_logical_axes(leaf.shape, fsdp, declared=declared.get(f'params/{name}'))
    spec = nn.logical_to_mesh_axes(axes, rules)
    if any(a is not None for a in spec):
      out[name] = [list(a) if isinstance(a, tuple) else a for a in spec]
  return out


# Configs added after the regex table was removed have no record from it.
RECORDED_CASES = [(name, variant) for name, variant in CASES if f'{name}:{variant}' in RECORDED]


@pytest.mark.parametrize('name, variant', RECORDED_CASES)
def test_declared_axes_give_the_recorded_shardings(name, variant):
  config, init = _model_and_init(name, variant)
  params = jax.eval_shape(init)['params']
  declared = sharding.declared_axes(init)
  # Nothing is boxed outside declared_axes: init gives plain arrays.
  assert not any(isinstance(x, nn.LogicallyPartitioned)
                 for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))
  for mesh_name, sizes in MESHES.items():
    recorded = RECORDED[f'{name}:{variant}'][mesh_name]
    assert len(jax.tree.leaves(params)) == recorded['params']
    got = _specs(params, declared, sizes['fsdp'], sharding.rules_of(config.mesh))
    assert got == recorded['sharded'], mesh_name


class _Renamed(nn.Module):
  """The NLMs' private weights under a name no pattern ever knew."""

  @nn.compact
  def __call__(self, x_DxIxB):
    return nlm.SuperLinear(in_dims=4, out_dims=6, n_neurons=8, name='any_name_at_all')(x_DxIxB)


def test_a_renamed_layer_keeps_its_axes():
  init = lambda: _Renamed().init(jax.random.key(0), jnp.ones((8, 4, 2)))
  declared = sharding.declared_axes(init)
  assert declared == {
      'params/any_name_at_all/w1': (None, None, 'neurons'),
      'params/any_name_at_all/b1': (None, 'neurons', None),
  }


def test_rules_map_logical_axes_onto_the_mesh():
  init = lambda: _Renamed().init(jax.random.key(0), jnp.ones((8, 4, 2)))
  params, declared = jax.eval_shape(init)['params'], sharding.declared_axes(init)
  assert _specs(params, declared, 1)['any_name_at_all/w1'] == [None, None, 'neuron']
  # Mapping neurons to fsdp splits the NLMs' weights over fsdp instead.
  rules = (('batch', ('data', 'fsdp')), ('neurons', 'fsdp'), ('fsdp', 'fsdp'))
  assert _specs(params, declared, 1, rules)['any_name_at_all/w1'] == [None, None, 'fsdp']
  # Unmapped: replicated.
  assert 'any_name_at_all/w1' not in _specs(params, declared, 1, (('batch', ('data', 'fsdp')),))


@pytest.mark.parametrize('rules, message', [
    ((('neurons', 'gpu'),), "unknown mesh axis 'gpu'"),
    ((('heads', 'neuron'),), "unknown logical axis 'heads'"),
    ((('batch', 'data'),), "'batch' must map to"),
    (('neurons',), 'expected pairs'),
    ((('neurons', 'neuron'), ('neurons', None)), 'appears twice'),
])
def test_bad_rules_are_named(rules, message):
  mesh = ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'neuron': 1, 'rules': rules})
  with pytest.raises(ValueError, match='config.mesh.rules=.*' + message):
    sharding.check_rules(mesh)


def test_default_rules_are_the_configs_and_older_configs_get_them():
  assert sharding.rules_of(sharding.default_mesh_config()) == sharding.DEFAULT_RULES
  assert sharding.rules_of(ml_collections.ConfigDict({'data': -1})) == sharding.DEFAULT_RULES
  # As config.json gives them back: lists.
  listed = json.loads(json.dumps(sharding.DEFAULT_RULES))
  assert sharding.rules_of(ml_collections.ConfigDict({'rules': listed})) == sharding.DEFAULT_RULES
