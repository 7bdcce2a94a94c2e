"""compile_check: memory and FLOPs of the partitioned train step, before a run."""

import importlib
import os
import subprocess
import sys

import pytest

from conftest import needs_8_devices
import jax

from ctm_jax import sharding
from ctm_jax.tools import compile_check
from ctm_jax.tools import flops
from ctm_jax import supervised
from ctm_jax import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from ctm_jax.configs import image


def _config(**mesh):
  config = image.get_config('smoke')
  config.mesh.update(mesh)
  return config


@needs_8_devices
@pytest.mark.slow  # three compilations, about 30 s on 2 cores
def test_flops_and_memory_scale_with_the_mesh():
  one = compile_check.check(_config(data=1), 1)
  data8 = compile_check.check(_config(data=8), 8)
  fsdp8 = compile_check.check(_config(data=1, fsdp=8), 8)
  # The same work, split 8 ways: the partitioned program's FLOPs fall 8x, the total stays.
  assert data8['flops_per_step'] == pytest.approx(one['flops_per_step'], rel=0.05)
  assert data8['partitioned_flops_one_tick'] == pytest.approx(
      one['partitioned_flops_one_tick'] / 8, rel=0.05
  )
  # Data parallelism replicates the state; fsdp splits its large kernels.
  assert data8['state_bytes_per_device'] == one['state_bytes_per_device']
  assert fsdp8['state_bytes_per_device'] < 0.5 * data8['state_bytes_per_device']
  assert one['peak_bytes_per_device'] > data8['peak_bytes_per_device'] > 0
  assert one['parameters'] == data8['parameters'] > 0


@pytest.mark.slow
def test_flops_count_every_tick():
  """The scaled count equals XLA's count of the same step with its ticks unrolled."""
  config = _config(data=1)
  result = compile_check.check(config, 1)
  unrolled = config.copy_and_resolve_references()
  unrolled.model.unroll = unrolled.model.iterations
  task = validation.validate(unrolled, num_devices=1)
  model = task.make_model(unrolled)
  mesh = sharding.make_mesh(unrolled.mesh, devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    run = supervised.setup(unrolled, model, task, mesh)
    batch = {
        name: jax.ShapeDtypeStruct((config.batch_size, *shape), dtype, sharding=run.batch_sharding)
        for name, (shape, dtype) in task.record_spec(config).items()
    }
    exact = flops.lowered_flops(run.train_step.lower(run.abstract_state, batch))
  # XLA's raw count of the looped step (one tick) is ~1% lower for this config.
  assert result['flops_per_step'] == pytest.approx(exact, rel=1e-3)


@pytest.mark.slow  # ~18 s: a fresh process compiling; check() itself is tested above
def test_command_line(tmp_path):
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  json_path = tmp_path / 'result.json'
  cmd = [
      sys.executable,
      '-m',
      'ctm_jax.tools.compile_check',
      f'--config={ROOT}/configs/image.py:smoke',
      '--num_devices=4',
      '--config.mesh.fsdp=2',
      f'--json={json_path}',
  ]
  done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert 'data=2, fsdp=2, neuron=1' in done.stdout
  assert 'peak per device' in done.stdout and 'FLOPs per step' in done.stdout
  assert json_path.exists()

  bad = subprocess.run(
      cmd[:-2] + ['--config.mesh.fsdp=3'], env=env, capture_output=True, text=True, timeout=300
  )
  assert bad.returncode == 2
  assert 'config.mesh.data=-1' in bad.stderr and "does not divide the run's 4 devices" in bad.stderr


@pytest.mark.parametrize('name,variant', [('parity', 'smoke'), ('mazes', 'smoke')])
def test_the_trainers_activation_estimate_matches_the_compiled_step(name, variant):
  # validation.check_memory refuses a run from this estimate before compiling;
  # it must track what XLA actually keeps for the backward pass.
  config = importlib.import_module(f'ctm_jax.configs.{name}').get_config(variant)
  config.batch_size = 128
  config.mesh.update(data=1)
  task = validation.validate(config, num_devices=1)
  estimate = validation._saved_activation_bytes(config, task.make_model(config), task, config.batch_size)
  compiled = compile_check.check(config, 1)
  # The residuals are most of XLA's temporaries (its transients are the rest): 0.85-0.91 measured.
  assert 0.75 * compiled['temp_bytes'] <= estimate <= 1.05 * compiled['temp_bytes']
