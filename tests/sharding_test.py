"""Sharded training on an 8-device CPU mesh equals the single-device run."""

import os

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from conftest import needs_8_devices
from ctm_jax.data import pipeline
from ctm_jax import sharding
from ctm_jax import supervised
from ctm_jax import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from ctm_jax.configs import parity as parity_config

MESHES = {
    'data8': dict(data=8, fsdp=1, neuron=1),
    'data2_fsdp4': dict(data=2, fsdp=4, neuron=1),
    'data2_fsdp2_neuron2': dict(data=2, fsdp=2, neuron=2),
    'neuron8': dict(data=1, fsdp=1, neuron=8),
}
STEPS = 3
# Small enough that the tiny test models have fsdp-sharded kernels.
TEST_FSDP_MIN_SIZE = 512


def parity_config_small():
  config = parity_config.get_config('smoke')
  config.model.update(d_model=32, d_input=16, heads=2, iterations=4, memory_length=4)
  config.batch_size = 16
  config.batch_size_test = 16
  return config


def image_config_small():
  from ctm_jax.configs import image as image_config

  config = image_config.get_config('smoke')
  config.batch_size = 16
  config.batch_size_test = 16
  return config


CONFIGS = {'parity': parity_config_small, 'image': image_config_small}


def _batches(config, task):
  loader = pipeline.make_train_loader(
      task.train_source(config), batch_size=config.batch_size, seed=config.seed
  )
  it = iter(loader)
  return [next(it) for _ in range(STEPS)]


def _train(config, mesh_axes, devices):
  config = config.copy_and_resolve_references()
  config.mesh.update(mesh_axes)
  task = validation.validate(config, num_devices=len(devices))
  model = task.make_model(config)
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  losses = []
  with jax.set_mesh(mesh):
    run = supervised.setup(config, model, task, mesh)
    state = run.init()
    for batch in _batches(config, task):
      state, metrics = run.train_step(state, sharding.global_batch(batch, mesh))
      losses.append(float(metrics['loss']))
  return state, np.array(losses)


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def single_device_run(request, monkeypatch_module):
  monkeypatch_module.setattr(sharding, 'FSDP_MIN_SIZE', TEST_FSDP_MIN_SIZE)
  config = CONFIGS[request.param]()
  return request.param, config, _train(config, MESHES['data8'] | {'data': 1}, jax.devices()[:1])


@pytest.fixture(scope='module')
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


# Every axis at once runs by default; the single-axis meshes are slow tests.
DEFAULT_MESH = 'data2_fsdp2_neuron2'


@needs_8_devices
@pytest.mark.parametrize(
    'mesh_name',
    [m if m == DEFAULT_MESH else pytest.param(m, marks=pytest.mark.slow) for m in sorted(MESHES)],
)
def test_sharded_steps_match_single_device(single_device_run, mesh_name):
  name, config, (want_state, want_losses) = single_device_run
  state, losses = _train(config, MESHES[mesh_name], jax.devices()[:8])
  np.testing.assert_allclose(losses, want_losses, atol=1e-5, rtol=1e-5, err_msg=name)
  assert int(state.step) == STEPS
  got, want = jax.device_get((state.params, state.batch_stats)), jax.device_get(
      (want_state.params, want_state.batch_stats)
  )
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f'{name} {path}')
  _check_layout(state, MESHES[mesh_name])


def _leaf(tree, path):
  for key in path.split('/'):
    tree = tree[key]
  return tree


def _check_layout(state, axes):
  """Parameters and Adam moments sit where the rules say, and really are split."""
  mu = state.opt_state[-1][0].mu  # AdamW's ScaleByAdamState, after the clip
  d_model = state.params['start_trace'].shape[0]
  for tree in (state.params, mu):
    w1 = _leaf(tree, 'tick/trace_processor_0_0/w1')
    trace = _leaf(tree, 'start_trace')
    if axes['neuron'] > 1:
      assert w1.sharding.spec == P(None, None, 'neuron')
      assert trace.sharding.spec == P('neuron', None)
      assert w1.addressable_shards[0].data.shape[-1] == d_model // axes['neuron']
    else:
      assert w1.sharding.is_fully_replicated
    kernels = {
        '/'.join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if path[-1].key == 'kernel' and leaf.size >= TEST_FSDP_MIN_SIZE
    }
    assert kernels
    for path, kernel in kernels.items():
      split = [n for n in kernel.sharding.spec if n is not None]
      if axes['fsdp'] > 1:
        if any(n % axes['fsdp'] == 0 for n in kernel.shape):
          assert split == ['fsdp'], (path, kernel.sharding.spec)
          assert kernel.addressable_shards[0].data.size == kernel.size // axes['fsdp']
      else:
        assert not split, (path, kernel.sharding.spec)
  assert state.step.sharding.is_fully_replicated
  assert state.synch['out_neuron_indices_left'].sharding.is_fully_replicated


@needs_8_devices
@pytest.mark.parametrize(
    'mesh, field, message',
    [
        (dict(data=-1, fsdp=3), 'mesh.data=-1', "does not divide the run's 8 devices"),
        (dict(data=3), 'mesh', 'needs 3 devices; the run has 8'),
        (dict(data=2, fsdp=2, neuron=1), 'mesh', 'needs 4 devices; the run has 8'),
        (dict(data=-1, fsdp=-1), 'mesh.fsdp', 'only one mesh axis may be -1'),
        (dict(data=0), 'mesh.data', 'positive integer or -1'),
        (dict(model=2), 'mesh.model', 'unknown mesh axis'),
        (dict(data=8, batch=1), 'mesh.batch', 'unknown mesh axis'),
    ],
)
def test_bad_mesh_is_rejected(mesh, field, message):
  config = parity_config_small()
  config.mesh = mesh
  with pytest.raises(ValueError, match=rf'config\.{field}.*{message}'):
    validation.validate(config)


@needs_8_devices
def test_batch_not_divisible_by_batch_axes():
  config = parity_config_small()
  config.mesh.update(data=2, fsdp=4)
  config.batch_size = 12
  with pytest.raises(ValueError, match=r'config\.batch_size=12: .*data x fsdp = 2 x 4 = 8'):
    validation.validate(config)
  config.batch_size = 16
  config.batch_size_test = 20
  with pytest.raises(ValueError, match=r'config\.batch_size_test=20'):
    validation.validate(config)


@needs_8_devices
def test_neurons_not_divisible_by_neuron_axis():
  config = parity_config_small()
  config.mesh.update(data=1, neuron=8)
  config.model.d_model = 36
  with pytest.raises(ValueError, match=r'config\.model\.d_model=36: .*config\.mesh\.neuron=8'):
    validation.validate(config)


def test_mesh_shape_resolves_free_axis():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 2, 'neuron': 1}, 8) == dict(
      data=4, fsdp=2, neuron=1
  )
  assert sharding.mesh_shape({'neuron': -1}, 4) == dict(data=1, fsdp=1, neuron=4)


def test_param_logical_axes():
  # Declared axes win (when they fit the shape); large kernels get fsdp.
  assert sharding.param_logical_axes((4, 8, 32), 4, declared=(None, None, 'neurons')) == (
      None,
      None,
      'neurons',
  )
  assert sharding.param_logical_axes((96, 64), 4, min_size=1) == ('fsdp', None)
  # Ties go to the output dimension; small or indivisible kernels stay whole.
  assert sharding.param_logical_axes((64, 64), 4, min_size=1) == (None, 'fsdp')
  assert sharding.param_logical_axes((64, 64), 4, min_size=10**6) == (None, None)
  assert sharding.param_logical_axes((3, 5), 4, min_size=1) == (None, None)
  assert sharding.param_logical_axes((64,), 4, min_size=1) == (None,)


@needs_8_devices
@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(tmp_path, monkeypatch):
  """Saved fsdp x neuron-sharded, restored data-parallel and on one device, values equal."""
  from ctm_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(sharding, 'FSDP_MIN_SIZE', TEST_FSDP_MIN_SIZE)
  config = parity_config_small()
  config.mesh.update(data=2, fsdp=2, neuron=2)
  saved, _ = _train(config, config.mesh.to_dict(), jax.devices()[:8])
  task = validation.validate(config)
  loader = pipeline.make_train_loader(
      task.train_source(config), batch_size=config.batch_size, seed=config.seed
  )
  iterator = iter(loader)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=1)
  checkpointer.save(STEPS, saved, iterator)
  checkpointer.wait()
  want = jax.device_get(saved)
  for mesh_axes, devices in (
      (dict(data=8, fsdp=1, neuron=1), jax.devices()[:8]),
      (dict(data=1, fsdp=1, neuron=1), jax.devices()[:1]),
  ):
    config.mesh.update(mesh_axes)
    task = validation.validate(config, num_devices=len(devices))
    model = task.make_model(config)
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    with jax.set_mesh(mesh):
      run = supervised.setup(config, model, task, mesh)
      restored = checkpointer.restore(STEPS, run.abstract_state, iter(loader))
    for (path, got), expected, target in zip(
        jax.tree_util.tree_leaves_with_path(restored),
        jax.tree.leaves(want),
        jax.tree.leaves(run.abstract_state),
    ):
      assert got.sharding == target.sharding, path
      np.testing.assert_array_equal(jax.device_get(got), expected, err_msg=str(path))
  checkpointer.close()


@needs_8_devices
def test_batch_shards_must_split_over_processes(monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  config = parity_config_small()
  config.mesh.update(data=1, neuron=8)
  with pytest.raises(
      ValueError, match=r'config\.mesh: data x fsdp = 1 batch shards .* 2 processes'
  ):
    validation.validate(config)
  config.mesh.update(data=2, neuron=4)
  validation.validate(config)
