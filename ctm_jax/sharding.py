"""Device mesh from the config, logical axes, and the shardings of state and batches.

Mesh axes (`config.mesh`, sizes by name; -1 takes the devices left over):
  data    pure data parallelism: the batch is split, parameters replicated.
  fsdp    the batch is split too, and large kernels are split along one axis
          (gathered for use, gradients reduce-scattered), as ZeRO-3 / FSDP.
  neuron  the D neurons are split: each device holds the NLM weights, the
          pre-activation traces and the start state of D / neuron neurons.

Logical axes name what a dimension is. A parameter declares its own where it
is created (`with_axes`: the NLMs' private weights and the start state along
`neurons`); large kernels that declare none get `fsdp` on their largest
dimension that splits evenly. `config.mesh.rules` maps logical axes onto mesh
axes; DEFAULT_RULES:
  batch    -> (data, fsdp)   (fixed: batches are split over both)
  neurons  -> neuron
  fsdp     -> fsdp

Dimension glossary: B batch, D neurons, M memory length, H NLM hidden width.
"""

import contextvars
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections

MESH_AXES = ('data', 'fsdp', 'neuron')
BATCH_AXES = ('data', 'fsdp')
LOGICAL_AXES = ('batch', 'neurons', 'fsdp')
DEFAULT_RULES = (('batch', BATCH_AXES), ('neurons', 'neuron'), ('fsdp', 'fsdp'))
# Kernels with fewer elements stay replicated: gathering them costs more than they weigh.
FSDP_MIN_SIZE = 2**14
# True while `declared_axes` traces an init: parameters then carry their axes.
_DECLARING = contextvars.ContextVar('declaring_axes', default=False)


def default_mesh_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'neuron': 1, 'rules': DEFAULT_RULES})


def rules_of(mesh_config) -> tuple:
  """config.mesh.rules as a tuple of (logical axis, mesh axes); DEFAULT_RULES
  where a config (e.g. an older run's config.json) has none."""
  rules = mesh_config.get('rules', None) if hasattr(mesh_config, 'get') else None
  if rules is None:
    return DEFAULT_RULES
  return tuple(
      (name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules
  )


def check_rules(mesh_config) -> None:
  """ValueError naming config.mesh.rules for a rule the mesh cannot honour."""
  raw = mesh_config.get('rules', None)
  if raw is None:
    return
  shown = f'config.mesh.rules={raw!r}'
  if not isinstance(raw, (list, tuple)) or not all(
      isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in raw
  ):
    raise ValueError(f'{shown}: expected pairs (logical axis, mesh axes), e.g. {DEFAULT_RULES!r}')
  rules = rules_of(mesh_config)
  names = [name for name, _ in rules]
  for name, axes in rules:
    if name not in LOGICAL_AXES:
      raise ValueError(f'{shown}: unknown logical axis {name!r}; expected {", ".join(LOGICAL_AXES)}')
    for axis in axes if isinstance(axes, tuple) else (axes,):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f'{shown}: {name!r} -> unknown mesh axis {axis!r}; expected {", ".join(MESH_AXES)}')
  if len(set(names)) != len(names):
    raise ValueError(f'{shown}: a logical axis appears twice')
  if dict(rules).get('batch', BATCH_AXES) != BATCH_AXES:
    raise ValueError(f"{shown}: 'batch' must map to {BATCH_AXES!r}: batches are split over both")


def with_axes(init_fn, names: tuple):
  """`init_fn` of a parameter whose dimensions are the logical axes `names`
  (None: not split). Declared where the parameter is created, so a renamed
  layer keeps them; read by `declared_axes`, invisible elsewhere (the
  parameter is a plain array)."""

  def init(*args, **kwargs):
    value = init_fn(*args, **kwargs)
    return nn.LogicallyPartitioned(value, tuple(names)) if _DECLARING.get() else value

  return init


def declared_axes(init_variables) -> dict[str, tuple]:
  """{'params/<path>': logical axes} of the parameters that declare theirs
  (`with_axes`), from a model's `init_variables()` (e.g. `lambda:
  model.init(key, example)`), traced abstractly: nothing is computed."""
  token = _DECLARING.set(True)
  try:
    # A fresh callable: eval_shape caches traces by function, and the boxed
    # trace must neither come from nor go to a plain caller's cache entry.
    boxed = jax.eval_shape(lambda: init_variables())  # pylint: disable=unnecessary-lambda
  finally:
    _DECLARING.reset(token)
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  return {
      _path(path): tuple(leaf.names)
      for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box)
      if is_box(leaf)
  }


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Axis sizes with -1 resolved; ValueError naming `config.mesh.<axis>`."""
  sizes = {k: v for k, v in dict(mesh_config).items() if k != 'rules'}
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
  """Checks the mesh, its rules and the batch sizes against it, naming the field."""
  sizes = mesh_shape(config.mesh, num_devices)
  check_rules(config.mesh)
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


def param_logical_axes(shape, fsdp_size: int, min_size: int | None = None, declared=None):
  """Logical axes of a parameter of `shape`: those it `declared`, else `fsdp`
  on a large kernel's largest evenly split dimension."""
  min_size = FSDP_MIN_SIZE if min_size is None else min_size
  if declared is not None and len(declared) == len(shape):
    return tuple(declared)
  if fsdp_size > 1 and len(shape) >= 2 and math.prod(shape) >= min_size:
    # The largest dimension that splits evenly; ties go to the last (output) one.
    candidates = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
    if candidates:
      dim = max(candidates, key=lambda i: (shape[i], i))
      return tuple('fsdp' if i == dim else None for i in range(len(shape)))
  return (None,) * len(shape)


def _spec(logical_axes, rules=DEFAULT_RULES) -> P:
  return nn.logical_to_mesh_axes(logical_axes, rules)


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, declared=None,
                    rules=DEFAULT_RULES, min_size: int | None = None):
  """NamedShardings for every leaf of a state with `params` and `opt_state`.

  Parameters follow `param_logical_axes` (`declared`: declared_axes's
  {path: axes}) mapped by `rules`. An optimiser-state leaf whose path ends
  with a parameter's path and has that parameter's shape (Adam's moments)
  gets the parameter's sharding; everything else (step, rng, neuron-pair
  indices, batch statistics, clip histories) is replicated.
  """
  declared = declared or {}
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
          axes = param_logical_axes(leaf.shape, fsdp_size, min_size, declared.get(f'params/{name}'))
          return NamedSharding(mesh, _spec(axes, rules))
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


def logical_rules(rules=DEFAULT_RULES):
  """Context under which the model's activation constraints take effect."""
  return nn.logical_axis_rules(rules)


def under_rules(fn, rules=DEFAULT_RULES):
  """`fn` traced under the logical axis rules, so its activation constraints apply."""

  def wrapped(*args):
    with logical_rules(rules):
      return fn(*args)

  return wrapped
