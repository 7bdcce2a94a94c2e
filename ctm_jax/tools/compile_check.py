"""Compiles the train step for N devices and prints its per-device memory and FLOPs.

  python -m ctm_jax.tools.compile_check --config=configs/image.py --num_devices=64 \
      --config.mesh.fsdp=8

Sizes a pod or GPU-cluster run before paying for it: the step is lowered for the
config's mesh over N fake CPU devices (nothing is allocated or run) and XLA's
`memory_analysis()` of the partitioned program is printed. Memory is for the
CPU backend's layouts and fusions, a guide to within tens of percent for
TPU/GPU. FLOPs are XLA's count of the whole step with every tick counted
(ctm_jax/tools/flops.py: XLA counts a loop body once), divided evenly over
the devices.
"""

import json
import sys
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from ctm_jax import sharding
from ctm_jax import storage
from ctm_jax import supervised
from ctm_jax import validation
from ctm_jax.tools import flops as flops_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, with an optional :variant.')
_NUM_DEVICES = flags.DEFINE_integer('num_devices', 8, 'Devices of the planned run (fake CPUs).')
_JSON = flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')

GIB = 2**30


def _tree_bytes_per_device(abstract_tree) -> int:
  """Bytes one device holds of a sharded tree (the largest shard of each leaf)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total


def check(config, num_devices: int) -> dict:
  """Lowers and compiles `config`'s train step on its mesh over `num_devices` devices."""
  task = validation.validate(config, num_devices=num_devices)
  model = task.make_model(config)
  devices = jax.devices()[:num_devices]
  if len(devices) < num_devices:
    raise ValueError(f'--num_devices={num_devices}: only {len(devices)} devices were created')
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  with jax.set_mesh(mesh):
    run = supervised.setup(config, model, task, mesh)
    batch = {
        name: jax.ShapeDtypeStruct((config.batch_size, *shape), dtype, sharding=run.batch_sharding)
        for name, (shape, dtype) in task.record_spec(config).items()
    }
    started = time.perf_counter()
    compiled = run.train_step.lower(run.abstract_state, batch).compile()
    compile_s = time.perf_counter() - started

    def lower(ticks, unroll):
      variant = config.copy_and_resolve_references()
      variant.model.update(iterations=ticks, unroll=unroll)
      validation.validate(variant, num_devices=num_devices)
      variant_model = task.make_model(variant)
      short = supervised.setup(variant, variant_model, task, mesh)
      return short.train_step.lower(short.abstract_state, batch)

    flops = flops_lib.tick_scaled_flops(lower, config.model.iterations)
  memory = compiled.memory_analysis()
  params = run.abstract_state.params
  result = {
      'mesh': dict(mesh.shape),
      'num_devices': num_devices,
      'batch_size': config.batch_size,
      'dtype': str(config.model.dtype),
      'remat': str(config.model.remat),
      'backbone_remat': str(config.model.get('backbone_remat', 'none')),
      'parameters': int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
      'state_bytes_per_device': _tree_bytes_per_device(run.abstract_state),
      'argument_bytes': memory.argument_size_in_bytes,
      'output_bytes': memory.output_size_in_bytes,
      'alias_bytes': memory.alias_size_in_bytes,
      'temp_bytes': memory.temp_size_in_bytes,
      'code_bytes': memory.generated_code_size_in_bytes,
      # Donated state aliases its outputs, so it is counted once.
      'peak_bytes_per_device': (
          memory.argument_size_in_bytes
          + memory.output_size_in_bytes
          - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes
      ),
      'flops_per_step': flops,
      # Every contraction is split over the mesh (tested), so the step's FLOPs divide.
      'flops_per_device': flops / num_devices,
      # The partitioned program's own count: one tick, per device.
      'partitioned_flops_one_tick': flops_lib.cost_flops(compiled),
      'compile_s': compile_s,
  }
  return result


def format_table(result: dict) -> str:
  rows = [
      ('mesh', ', '.join(f'{k}={v}' for k, v in result['mesh'].items())),
      ('global batch', f"{result['batch_size']}"),
      (
          'compute dtype / remat / backbone remat',
          f"{result['dtype']} / {result['remat']} / {result['backbone_remat']}",
      ),
      ('parameters', f"{result['parameters']:,}"),
      ('train state per device', f"{result['state_bytes_per_device'] / GIB:.3f} GiB"),
      ('arguments per device', f"{result['argument_bytes'] / GIB:.3f} GiB"),
      ('temporaries per device', f"{result['temp_bytes'] / GIB:.3f} GiB"),
      ('peak per device', f"{result['peak_bytes_per_device'] / GIB:.3f} GiB"),
      ('FLOPs per device per step', f"{result['flops_per_device']:.4g}"),
      ('FLOPs per step (all devices)', f"{result['flops_per_step']:.4g}"),
      ('compile time (CPU)', f"{result['compile_s']:.1f} s"),
  ]
  width = max(len(name) for name, _ in rows)
  return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required')
  if _NUM_DEVICES.value < 1:
    raise app.UsageError(f'--num_devices={_NUM_DEVICES.value}: must be positive')
  # Fake devices on the host CPU, before anything initialises a backend.
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', _NUM_DEVICES.value)
  try:
    result = check(_CONFIG.value, _NUM_DEVICES.value)
  except ValueError as e:
    print(f'compile_check: {e}', file=sys.stderr)
    sys.exit(2)
  print(format_table(result))
  if _JSON.value:
    storage.write_text(storage.resolve(_JSON.value, '--json'), json.dumps(result, indent=2))


if __name__ == '__main__':
  app.run(main)
