"""PyTorch reference state_dict -> ctm-jax variables. All renames live here.

Naming rule: a Flax path is the reference's module path with numeric
Sequential indices fused to the preceding name (`kv_proj.0` -> `kv_proj_0`,
`backbone.layer1.0.conv1` -> `backbone/layer1_0/conv1`). Modules that run
inside the tick loop live under `tick/`. Leaves: Linear/Conv `weight` ->
`kernel` (transposed), norm `weight` -> `scale`, `running_mean/var` ->
`batch_stats` `mean/var`, SuperLinear `T` -> `temperature`, Embedding
`weight` -> `embedding`. The attention's packed `in_proj` is split into
`tick/attention_q` and the hoisted `attention_k`, `attention_v`.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax.models import ctm as ctm_lib

# Reference modules evaluated once per tick.
TICK_MODULES = ('q_proj', 'synapses', 'trace_processor', 'output_projector')
BATCH_STAT_LEAVES = {'running_mean': 'mean', 'running_var': 'var'}
IGNORED_LEAVES = ('num_batches_tracked',)


class StateDictMismatch(ValueError):
  """Raised with every missing, unknown and mis-shaped key at once."""


def to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def module_path(key: str) -> tuple[str, ...]:
  """Flax module path and torch leaf name of a reference key."""
  parts = key.split('.')
  path: list[str] = []
  for part in parts[:-1]:
    if part.isdigit() and path:
      path[-1] = f'{path[-1]}_{part}'
    else:
      path.append(part)
  if parts[0] in TICK_MODULES:
    path.insert(0, 'tick')
  return tuple(path) + (parts[-1],)


def _convert_weight(value, target_leaves):
  if 'kernel' in target_leaves:
    if value.ndim == 4:  # conv (O, I, kh, kw) -> (kh, kw, I, O)
      return 'kernel', value.transpose(2, 3, 1, 0)
    return 'kernel', value.T
  if 'embedding' in target_leaves:
    return 'embedding', value
  return 'scale', value


def _attention_entries(key, value):
  """The packed MHA tensors as (collection, path, array) entries."""
  if key == 'attention.in_proj_weight':
    q, k, v = np.split(value, 3, axis=0)
    return [('params', ('tick', 'attention_q', 'kernel'), q.T),
            ('params', ('attention_k', 'kernel'), k.T),
            ('params', ('attention_v', 'kernel'), v.T)]
  if key == 'attention.in_proj_bias':
    q, k, v = np.split(value, 3)
    return [('params', ('tick', 'attention_q', 'bias'), q),
            ('params', ('attention_k', 'bias'), k),
            ('params', ('attention_v', 'bias'), v)]
  leaf = 'kernel' if key.endswith('weight') else 'bias'
  return [('params', ('tick', 'attention_out', leaf), value.T if leaf == 'kernel' else value)]


def _lookup(tree, path):
  for name in path:
    if not isinstance(tree, Mapping) or name not in tree:
      return None
    tree = tree[name]
  return tree


def _entries(key, value, abstract):
  """(collection, flax path, array) for one reference entry; [] if ignored."""
  if key.startswith('attention.'):
    return _attention_entries(key, value)
  if key.endswith('_neuron_indices_left') or key.endswith('_neuron_indices_right'):
    return [('synch', (key,), value.astype(np.int32))]
  *path, leaf = module_path(key)
  path = tuple(path)
  if leaf in IGNORED_LEAVES:
    return []
  if leaf in BATCH_STAT_LEAVES:
    return [('batch_stats', path + (BATCH_STAT_LEAVES[leaf],), value)]
  if leaf == 'T':
    return [('params', path + ('temperature',), value)]
  if leaf == 'weight':
    target = _lookup(abstract.get('params', {}), path) or {}
    name, converted = _convert_weight(value, target)
    return [('params', path + (name,), converted)]
  return [('params', path + (leaf,), value)]


def _flatten(tree, prefix=()):
  out = {}
  for name, sub in tree.items():
    if isinstance(sub, Mapping):
      out.update(_flatten(sub, prefix + (name,)))
    else:
      out[prefix + (name,)] = sub
  return out


def _unflatten(flat):
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree


def example_input(state_dict: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any]):
  """A batch-of-one input whose channel count matches the stored weights."""
  backbone = model_kwargs['backbone_type']
  if backbone == 'parity_backbone':
    return jnp.ones((1, 4), jnp.float32)
  if 'resnet' in backbone:
    channels = state_dict['initial_rgb.weight'].shape[1]
    return jnp.zeros((1, 32, 32, channels), jnp.float32)
  if backbone == 'shallow-wide':
    channels = state_dict['backbone.layers.0.weight'].shape[1]
    return jnp.zeros((1, 8, 8, channels), jnp.float32)
  channels = state_dict['kv_proj.0.weight'].shape[1]
  return jnp.zeros((1, 4, channels), jnp.float32)


def convert_state_dict(state_dict: Mapping[str, Any], abstract_variables):
  """Reference state_dict -> variables shaped like `abstract_variables`.

  Every key must be consumed and every target filled with the right shape;
  otherwise one StateDictMismatch lists all the problems.
  """
  targets = {}
  for collection, tree in abstract_variables.items():
    for path, leaf in _flatten(tree).items():
      targets[(collection,) + path] = leaf
  filled, unknown, misshaped = {}, [], []
  for key, value in state_dict.items():
    value = to_numpy(value)
    for collection, path, array in _entries(key, value, abstract_variables):
      full = (collection,) + path
      if full not in targets:
        unknown.append(f'{key} (-> {"/".join(full)})')
      elif tuple(array.shape) != tuple(targets[full].shape):
        misshaped.append(f'{key}: got {tuple(value.shape)}, expected '
                         f'{tuple(targets[full].shape)} at {"/".join(full)}')
      else:
        filled[full] = jnp.asarray(array, dtype=targets[full].dtype)
  missing = ['/'.join(p) for p in targets if p not in filled]
  if unknown or missing or misshaped:
    lines = []
    for title, items in (('unknown keys', unknown), ('missing variables', missing),
                         ('mis-shaped keys', misshaped)):
      if items:
        lines.append(f'{title} ({len(items)}):\n  ' + '\n  '.join(items))
    raise StateDictMismatch('state_dict does not match the model:\n' + '\n'.join(lines))
  flat = {}
  for (collection, *path), value in filled.items():
    flat[(collection, *path)] = value
  return _unflatten(flat)


def import_state_dict(state_dict: Mapping[str, Any], model_kwargs: Mapping[str, Any]):
  """Builds the CTM for the reference's constructor kwargs and loads its weights.

  Returns (model, variables). The decay parameters are projected onto
  [0, 15], as the reference's forward does in place.
  """
  state_dict = {k: to_numpy(v) for k, v in state_dict.items()}
  model = ctm_lib.ContinuousThoughtMachine(**model_kwargs)
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            example_input(state_dict, model_kwargs))
  variables = convert_state_dict(state_dict, abstract)
  variables['params'] = ctm_lib.project_decay_params(variables['params'])
  return model, variables
