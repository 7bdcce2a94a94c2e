"""Device mesh from the config, logical axes, and the shardings of state and batches.

Mesh axes (`config.mesh`, sizes by name; -1 takes the devices left over):
  data    pure data parallelism: the batch is split, parameters replicated.
  fsdp    the batch is split too, and large kernels are split along one axis
          (gathered for use, gradients reduce-scattered), as ZeRO-3 / FSDP.
  neuron  the D neurons are split: each device holds the NLM weights, the
          pre-activation traces and the start state of D / neuron neurons.

Logical axes name what a dimension is; RULES map them onto mesh axes:
  batch    -> (data, fsdp)
  neurons  -> neuron
  fsdp     -> fsdp

Dimension glossary: B batch, D neurons, M memory length, H NLM hidden width.
"""

import math
import re
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections

MESH_AXES = ('data', 'fsdp', 'neuron')
BATCH_AXES = ('data', 'fsdp')
RULES = (('batch', BATCH_AXES), ('neurons', 'neuron'), ('fsdp', 'fsdp'))
# Kernels with fewer elements stay replicated: gathering them costs more than they weigh.
FSDP_MIN_SIZE = 2**14

# Parameters on the neuron axis, by the end of their path: the NLMs' private
# weights (w1 (I, H, D), b1 (1, D, H)) and the per-neuron start state.
_NEURON_RULES = (
    (re.compile(r'trace_processor[^/]*/w1$'), (None, None, 'neurons')),
    (re.compile(r'trace_processor[^/]*/b1$'), (None, 'neurons', None)),
    (re.compile(r'(^|/)start_trace$'), ('neurons', None)),
    (re.compile(r'(^|/)start_activated_state$'), ('neurons',)),
)


def default_mesh_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'neuron': 1})


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Axis sizes with -1 resolved; ValueError naming `config.mesh.<axis>`."""
  sizes = dict(mesh_config)
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(
        f'config.mesh.{unknown[0]}={sizes[unknown[0]]!r}: unknown mesh axis; '
        f'expected {", ".join(MESH_AXES)}'
    )
  for axis in MESH_AXES:
    size = sizes.setdefault(axis, 1)
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f'config.mesh.{axis}={size!r}: must be a positive integer or -1')
  free = [a for a in MESH_AXES if sizes[a] == -1]
  if len(free) > 1:
    raise ValueError(
        f'config.mesh.{free[1]}=-1: only one mesh axis may be -1 '
        f'(also config.mesh.{free[0]}=-1)'
    )
  fixed = math.prod(sizes[a] for a in MESH_AXES if sizes[a] != -1)
  described = ', '.join(f'{a}={sizes[a]}' for a in MESH_AXES)
  if free:
    if num_devices % fixed:
      raise ValueError(
          f'config.mesh.{free[0]}=-1: the other axes ({described}) use {fixed} devices, '
          f"which does not divide the run's {num_devices} devices"
      )
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f'config.mesh ({described}) needs {fixed} devices; the run has {num_devices} '
        '(set one axis to -1 to absorb them)'
    )
  return {a: sizes[a] for a in MESH_AXES}


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """The config's mesh over `devices` (all devices of all processes by default)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
      tuple(shape.values()),
      MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
      devices=devices,
  )


def batch_shards(mesh_sizes: dict[str, int]) -> int:
  return math.prod(mesh_sizes[a] for a in BATCH_AXES)


def validate(config, num_devices: int) -> dict[str, int]:
  """Checks the mesh and the batch sizes against it, naming the field."""
  sizes = mesh_shape(config.mesh, num_devices)
  shards = batch_shards(sizes)
  batch_fields = [f for f in ('batch_size', 'batch_size_test') if f in config]
  for field in batch_fields:
    if config[field] % shards:
      raise ValueError(
          f'config.{field}={config[field]}: must be divisible by the mesh batch axes '
          f'data x fsdp = {sizes["data"]} x {sizes["fsdp"]} = {shards}'
      )
  d_model = config.model.d_model
  if d_model % sizes['neuron']:
    raise ValueError(
        f'config.model.d_model={d_model}: must be divisible by config.mesh.neuron={sizes["neuron"]}'
    )
  processes = jax.process_count()
  if shards % processes:
    # Each process feeds its own rows, so no batch shard may span processes.
    raise ValueError(
        f'config.mesh: data x fsdp = {shards} batch shards cannot be split over the '
        f'{processes} processes; make data x fsdp a multiple of {processes}'
    )
  for field in batch_fields:
    if config[field] % processes:
      raise ValueError(
          f'config.{field}={config[field]}: must be divisible by the {processes} processes'
      )
  return sizes


def _path(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/')


def param_logical_axes(path: str, shape, fsdp_size: int, min_size: int | None = None):
  """Logical axes of the parameter at `path` (a '/'-joined name) of `shape`."""
  min_size = FSDP_MIN_SIZE if min_size is None else min_size
  for pattern, axes in _NEURON_RULES:
    if pattern.search(path) and len(axes) == len(shape):
      return axes
  if fsdp_size > 1 and len(shape) >= 2 and math.prod(shape) >= min_size:
    # The largest dimension that splits evenly; ties go to the last (output) one.
    candidates = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
    if candidates:
      dim = max(candidates, key=lambda i: (shape[i], i))
      return tuple('fsdp' if i == dim else None for i in range(len(shape)))
  return (None,) * len(shape)


def _spec(logical_axes) -> P:
  return nn.logical_to_mesh_axes(logical_axes, RULES)


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, min_size: int | None = None):
  """NamedShardings for every leaf of a TrainState.

  Parameters follow `param_logical_axes`. An optimiser-state leaf whose path ends
  with a parameter's path and has that parameter's shape (Adam's moments) gets
  the parameter's sharding; everything else (step, rng, neuron-pair indices,
  batch statistics, clip histories) is replicated.
  """
  fsdp_size = mesh.shape['fsdp']
  params = {
      _path(path): leaf.shape
      for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state.params)
  }

  def sharding(path, leaf):
    parts = _path(path).split('/')
    if parts[0] in ('params', 'opt_state'):
      for i in range(1, len(parts)):
        name = '/'.join(parts[i:])
        if params.get(name) == leaf.shape:
          axes = param_logical_axes(name, leaf.shape, fsdp_size, min_size)
          return NamedSharding(mesh, _spec(axes))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(sharding, abstract_state)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """This process's rows -> one global array per leaf, sharded over the batch axes.

  Each process passes its own rows (per-host batch); the global batch is their
  concatenation in process order.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def constrain(x, logical_axes):
  """Activation sharding hint; a no-op outside `logical_rules()` and a mesh."""
  return nn.with_logical_constraint(x, logical_axes)


def logical_rules():
  """Context under which the model's activation constraints take effect."""
  return nn.logical_axis_rules(RULES)


def under_rules(fn):
  """`fn` traced under the logical axis rules, so its activation constraints apply."""

  def wrapped(*args):
    with logical_rules():
      return fn(*args)

  return wrapped
