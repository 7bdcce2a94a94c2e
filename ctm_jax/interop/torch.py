"""PyTorch reference state_dict <-> ctm-jax variables. All renames live here.

Naming rule: a Flax path is the reference's module path with numeric
Sequential indices fused to the preceding name (`kv_proj.0` -> `kv_proj_0`,
`backbone.layer1.0.conv1` -> `backbone/layer1_0/conv1`). Modules that run
inside the tick loop live under `tick/`. Leaves: Linear/Conv `weight` ->
`kernel` (transposed), norm `weight` -> `scale`, `running_mean/var` ->
`batch_stats` `mean/var`, SuperLinear `T` -> `temperature`, Embedding
`weight` -> `embedding`. The attention's packed `in_proj` is split into
`tick/attention_q` and the hoisted `attention_k`, `attention_v`.
`to_state_dict` is the inverse: variables -> a state_dict the reference loads.
"""

import dataclasses
import json
import os
import re
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import artefact
from ctm_jax import extras
from ctm_jax import manifest
from ctm_jax import outputs
from ctm_jax import storage
from ctm_jax import tasks as tasks_lib
from ctm_jax import validation
from ctm_jax.interop import hub
from ctm_jax.models import ctm as ctm_lib

# Reference modules evaluated once per tick.
TICK_MODULES = ('q_proj', 'synapses', 'trace_processor', 'output_projector')
BATCH_STAT_LEAVES = {'running_mean': 'mean', 'running_var': 'var'}
IGNORED_LEAVES = ('num_batches_tracked',)
# The reference's RL agent holds its recurrent model under this name.
AGENT_RECURRENT = 'recurrent_model'


class StateDictMismatch(ValueError):
  """Raised with every missing, unknown and mis-shaped key at once, on one line."""


def to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor
    value = value.detach().cpu().numpy()
  # A copy: the source may be a live torch buffer that keeps changing.
  return np.array(value, copy=True)


def module_path(key: str) -> tuple[str, ...]:
  """Flax module path and torch leaf name of a reference key."""
  parts = key.split('.')
  path: list[str] = []
  for part in parts[:-1]:
    if part.isdigit() and path:
      path[-1] = f'{path[-1]}_{part}'
    else:
      path.append(part)
  # The agent's recurrent model (the RL scripts' `recurrent_model.*`) nests the same layout.
  nested = 1 if parts[0] == AGENT_RECURRENT and len(parts) > 2 else 0
  if parts[nested] in TICK_MODULES:
    path.insert(nested, 'tick')
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
    return [
        ('params', ('tick', 'attention_q', 'kernel'), q.T),
        ('params', ('attention_k', 'kernel'), k.T),
        ('params', ('attention_v', 'kernel'), v.T),
    ]
  if key == 'attention.in_proj_bias':
    q, k, v = np.split(value, 3)
    return [
        ('params', ('tick', 'attention_q', 'bias'), q),
        ('params', ('attention_k', 'bias'), k),
        ('params', ('attention_v', 'bias'), v),
    ]
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


_FUSED = re.compile(r'^(.*?)((?:_\d+)+)$')
_LEAF_NAMES = {'scale': 'weight', 'embedding': 'weight', 'temperature': 'T'}


def _torch_prefix(path) -> list[str]:
  """A Flax module path -> the reference's module path (`tick/` dropped,
  fused Sequential indices split again: `layer1_0` -> `layer1.0`)."""
  parts = []
  for name in path:
    if name == 'tick':
      continue
    fused = _FUSED.match(name)
    if fused and fused.group(1):
      parts += [fused.group(1), *fused.group(2)[1:].split('_')]
    else:
      parts.append(name)
  return parts


def to_state_dict(variables, model=None) -> dict[str, np.ndarray]:
  """ctm-jax variables -> the reference's state_dict (numpy arrays; wrap each
  in torch.from_numpy to load it): the inverse of `convert_state_dict`, plus
  the `num_batches_tracked` counters torch's batch norms carry (0) and, given
  the `model`, the fixed buffers the reference stores (`reference_constants`)."""
  out = {key: np.array(value) for key, value in reference_constants(model).items()}
  packed = {}
  for path, value in _flatten(variables.get('params', {})).items():
    value = np.asarray(value)
    module, leaf = path[:-1], path[-1]
    name = module[-1] if module else ''
    if name in ('attention_q', 'attention_k', 'attention_v'):
      packed[(name[-1], leaf)] = value.T if leaf == 'kernel' else value
      continue
    if name == 'attention_out':
      out[f'attention.out_proj.{"weight" if leaf == "kernel" else "bias"}'] = (
          value.T if leaf == 'kernel' else value
      )
      continue
    if leaf == 'kernel':
      leaf, value = 'weight', value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    out['.'.join(_torch_prefix(module) + [_LEAF_NAMES.get(leaf, leaf)])] = value
  if packed:
    for leaf, torch_leaf in (('kernel', 'in_proj_weight'), ('bias', 'in_proj_bias')):
      out[f'attention.{torch_leaf}'] = np.concatenate([packed[(q, leaf)] for q in 'qkv'])
  for path, value in _flatten(variables.get('batch_stats', {})).items():
    prefix = '.'.join(_torch_prefix(path[:-1]))
    out[f'{prefix}.running_{path[-1]}'] = np.asarray(value)
    out[f'{prefix}.num_batches_tracked'] = np.zeros((), np.int64)
  for name, value in variables.get('synch', {}).items():
    out[name] = np.asarray(value).astype(np.int64)
  return out


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
  if 'kv_proj.0.weight' not in state_dict:  # no attention: (B, d_input) straight to the synapses
    return jnp.zeros((1, model_kwargs['d_input']), jnp.float32)
  channels = state_dict['kv_proj.0.weight'].shape[1]
  return jnp.zeros((1, 4, channels), jnp.float32)


def convert_state_dict(
    state_dict: Mapping[str, Any], abstract_variables, fallback=None, skipped=None
):
  """Reference state_dict -> variables shaped like `abstract_variables`.

  Every key must be consumed and every target filled with the right shape;
  otherwise one StateDictMismatch lists all the problems. With `fallback`
  (variables, e.g. a fresh init) the load is non-strict, as torch's
  `strict=False`: unknown keys are ignored and missing variables keep the
  fallback's values, each listed in `skipped`; a mis-shaped key still fails.
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
        misshaped.append(
            f'{key}: got {tuple(value.shape)}, expected '
            f'{tuple(targets[full].shape)} at {"/".join(full)}'
        )
      else:
        filled[full] = jnp.array(array, dtype=targets[full].dtype)
  missing = ['/'.join(p) for p in targets if p not in filled]
  if fallback is not None and not misshaped:
    flat_fallback = {
        (collection,) + path: leaf
        for collection, tree in fallback.items()
        for path, leaf in _flatten(tree).items()
    }
    for p in targets:
      if p not in filled:
        filled[p] = flat_fallback[p]
    if skipped is not None:
      skipped += [f'ignored key {k}' for k in unknown]
      skipped += [f'missing, left at initialisation: {m}' for m in missing]
    unknown, missing = [], []
  if unknown or missing or misshaped:
    lines = []
    for title, items in (
        ('unknown keys', unknown),
        ('missing variables', missing),
        ('mis-shaped keys', misshaped),
    ):
      if items:
        lines.append(f'{title} ({len(items)}): ' + ', '.join(items))
    raise StateDictMismatch('state_dict does not match the model: ' + '; '.join(lines))
  flat = {}
  for (collection, *path), value in filled.items():
    flat[(collection, *path)] = value
  return _unflatten(flat)


def reference_constants(model) -> dict[str, np.ndarray]:
  """Buffers of the reference's state_dict that the model computes itself."""
  return model.reference_constants() if hasattr(model, 'reference_constants') else {}


def _drop_constants(state_dict, constants, strict, skipped):
  """`state_dict` without the model's fixed buffers, each checked against the
  values the model uses (a checkpoint with other values would not run as saved)."""
  out = dict(state_dict)
  for key, want in constants.items():
    if key not in out:
      if strict:
        raise StateDictMismatch(f'state_dict does not match the model: missing key {key} (a fixed buffer)')
      if skipped is not None:
        skipped.append(f'missing fixed buffer {key} (the model computes it)')
      continue
    got = out.pop(key)
    if got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=1e-5):
      raise StateDictMismatch(
          f'state_dict does not match the model: {key}: a fixed buffer of shape {want.shape} '
          f'that the model computes; this checkpoint holds {"other values" if got.shape == want.shape else f"shape {got.shape}"}'
      )
  return out


def import_state_dict(
    state_dict: Mapping[str, Any],
    model_kwargs: Mapping[str, Any],
    model_class=ctm_lib.ContinuousThoughtMachine,
    strict: bool = True,
    skipped: list | None = None,
):
  """Builds `model_class` for the reference's constructor kwargs and loads its weights.

  Returns (model, variables). The decay parameters are projected onto
  [0, 15], as the reference's forward does in place (not for the variants
  that clamp inside the graph, sort and RL). `strict=False` ignores
  unknown keys and initialises missing variables (seed 0), listing each in
  `skipped`.
  """
  state_dict = {k: to_numpy(v) for k, v in state_dict.items()}
  model = model_class(**model_kwargs)
  state_dict = _drop_constants(state_dict, reference_constants(model), strict, skipped)
  if hasattr(model_class, 'example_input'):
    example = model_class.example_input(state_dict, model_kwargs)
  else:
    example = example_input(state_dict, model_kwargs)
  # A tuple is several positional inputs (the RL models' observation and carried state).
  example = example if isinstance(example, tuple) else (example,)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *example)
  fallback = None if strict else model.init(jax.random.key(0), *example)
  variables = convert_state_dict(state_dict, abstract, fallback, skipped)
  if not getattr(model_class, 'decay_clamp_in_graph', False):  # variants that clamp in the graph keep them as saved
    variables['params'] = ctm_lib.project_decay_params(variables['params'])
  return model, variables


# ---------------------------------------------------------------------------
# Command line: a reference training checkpoint -> ctm-jax workdir.
#
#   python -m ctm_jax.interop.torch --checkpoint=run/checkpoint.pt --workdir=DIR
#
# writes DIR/config.json (task, source, model kwargs) and DIR/checkpoint
# (orbax, the `params` / `synch` / `batch_stats` collections). `load_imported`
# reads them back.

# Saved arg -> constructor kwarg, identical in the three training scripts.
ARG_TO_KWARG = {
    'iterations': 'iterations',
    'd_model': 'd_model',
    'd_input': 'd_input',
    'heads': 'heads',
    'n_synch_out': 'n_synch_out',
    'n_synch_action': 'n_synch_action',
    'synapse_depth': 'synapse_depth',
    'memory_length': 'memory_length',
    'deep_memory': 'deep_nlms',
    'memory_hidden_dims': 'memory_hidden_dims',
    'do_normalisation': 'do_layernorm_nlm',
    'backbone_type': 'backbone_type',
    'positional_embedding_type': 'positional_embedding_type',
    'dropout': 'dropout',
    'neuron_select_type': 'neuron_select_type',
    'n_random_pairing_self': 'n_random_pairing_self',
}
# Training-only args that released checkpoints leave out: their inference values.
INFERENCE_DEFAULTS = {'dropout': 0.0, 'n_random_pairing_self': 0}
CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoint'


def _as_dict(args) -> dict:
  return dict(args) if isinstance(args, Mapping) else dict(vars(args))


def detect_task(args) -> str:
  """Which task's reference training script saved `args` (their argparse fields differ)."""
  args = _as_dict(args)
  importing = [task.name for task in tasks_lib.with_part(tasks_lib.ImportsReference)]
  found = [name for name in importing if tasks_lib.get(name).matches_reference_args(args)]
  if len(found) != 1:
    raise ValueError(
        f'cannot tell the task from the saved args (dataset={args.get("dataset")!r}; '
        f'{"several match: " + ", ".join(found) if found else "no task recognises them"}); '
        f'pass --task, one of {", ".join(importing)}'
    )
  return found[0]


def importing_task(name: str):
  """The task `name`, which must import the reference's checkpoints; ValueError otherwise."""
  task = tasks_lib.get(name)
  if not isinstance(task, tasks_lib.ImportsReference):
    importing = [t.name for t in tasks_lib.with_part(tasks_lib.ImportsReference)]
    raise ValueError(f'--task={name}: it imports no reference checkpoints; expected one of {", ".join(importing)}')
  return task


def model_kwargs_from_args(args, task: str | None = None) -> dict:
  """Reference constructor kwargs from a training script's saved `args`.

  `args` is the argparse.Namespace stored under 'args' (or a dict of it).
  Generic fields map through ARG_TO_KWARG (`deep_memory` -> deep_nlms,
  `do_normalisation` -> do_layernorm_nlm); the task sets out_dims,
  prediction_reshaper and dropout_nlm as its script does. Raises ValueError
  naming the field that is missing or inconsistent.
  """
  args = _as_dict(args)
  task_name = task or detect_task(args)
  task = importing_task(task_name)
  model_type = reference_model_type(args, task_name)
  if model_type != 'ctm' or task.reference_args_by_name:
    return _baseline_kwargs(args, task, model_type)
  defaults = {**INFERENCE_DEFAULTS, **task.reference_arg_defaults}
  missing = [name for name in ARG_TO_KWARG if args.get(name) is None and name not in defaults]
  if missing:
    raise ValueError(
        f'saved args lack {", ".join(map(repr, missing))}, needed for the {task_name} model'
    )
  args = {**defaults, **{k: v for k, v in args.items() if v is not None}}
  kwargs = {kwarg: args[name] for name, kwarg in ARG_TO_KWARG.items()}
  kwargs['deep_nlms'] = bool(kwargs['deep_nlms'])
  kwargs['do_layernorm_nlm'] = bool(kwargs['do_layernorm_nlm'])
  head = task.reference_model_kwargs(args)
  # The scripts store their own out_dims in args before saving; they must agree.
  if args.get('out_dims') is not None and int(args['out_dims']) != head['out_dims']:
    raise ValueError(
        f'saved args: out_dims={args["out_dims"]} but the {task_name} task gives {head["out_dims"]}'
    )
  kwargs.update(head)
  return kwargs


def reference_model_type(args, task: str) -> str:
  """'ctm', or the baseline (the task's `baselines`) that saved `args`: the
  script's --model / --model_type field; absent in runs older than baselines."""
  args = _as_dict(args)
  task_lib = importing_task(task)
  value = args.get(task_lib.reference_model_field) or 'ctm'
  try:
    task_lib.model_class_for(value)
  except ValueError:
    raise ValueError(
        f'saved args: {task_lib.reference_model_field}={value!r}; task {task!r} imports '
        f'{", ".join(map(repr, task_lib.model_types()))}'
    ) from None
  return value


def _baseline_kwargs(args: dict, task, model_type: str) -> dict:
  """A baseline's constructor kwargs: the saved args of the same names, the
  task's head (out_dims, prediction_reshaper, and what its script fixes)."""
  model_class = task.model_class_for(model_type)
  fields = {
      f.name: f for f in dataclasses.fields(model_class) if f.init and f.name not in ('parent', 'name', 'dtype')
  }
  head = task.reference_model_kwargs({**args, 'model_type': model_type})
  values = {**INFERENCE_DEFAULTS, **{k: v for k, v in args.items() if v is not None}}
  kwargs = {name: values[name] for name in fields if name in values}
  kwargs.update({k: v for k, v in head.items() if k in fields})
  missing = [
      name for name, f in fields.items()
      if name not in kwargs and f.default is dataclasses.MISSING
  ]
  if missing:
    raise ValueError(f'saved args lack {", ".join(map(repr, missing))}, needed for the {model_type} baseline')
  return kwargs


def _import_torch():
  return extras.module('torch', 'reading a PyTorch checkpoint')


def _clean_state_dict(state_dict, torch) -> dict:
  """float32 numpy arrays under the plain module keys.

  Strips `module.` (DataParallel / DDP) and `_orig_mod.` (the mazes and image
  scripts' --do_compile wraps `synapses` in torch.compile) from the keys.
  """
  out = {}
  for key, value in state_dict.items():
    key = key.replace('._orig_mod.', '.')
    for prefix in ('module.', '_orig_mod.'):
      key = key[len(prefix) :] if key.startswith(prefix) else key
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      if value.is_floating_point() and value.dtype != torch.float32:
        value = value.float()  # numpy has no bfloat16
    out[key] = to_numpy(value)
  return out


def _safe_globals():
  """What a reference checkpoint pickles besides tensors: its argparse args, and
  numpy arrays, dtypes and scalars (the RNG states and metric lists). Each only
  rebuilds data; none runs code of the file's choosing."""
  import argparse  # pylint: disable=g-import-not-at-top

  multiarray = getattr(np, '_core', None) or np.core
  kinds = (np.uint8, np.uint32, np.int32, np.int64, np.float32, np.float64, np.bool_)
  safe = [argparse.Namespace, np.ndarray, np.dtype, multiarray.multiarray._reconstruct]
  safe += [multiarray.multiarray.scalar] + [type(np.dtype(kind)) for kind in kinds]
  # Pickles from numpy < 2 name numpy.core.*; numpy >= 2 names numpy._core.*.
  safe += [
      (multiarray.multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
      (multiarray.multiarray.scalar, 'numpy.core.multiarray.scalar'),
  ]
  return safe


def load_reference_checkpoint(path: str, trust_pickle: bool = False):
  """(state_dict, args dict or None, iteration) of a reference training
  checkpoint; args are None for a file that saved none (the community's
  `{'model_state_dict': ...}`: its kwargs come from elsewhere).

  By default the file is unpickled with torch's weights-only loader, which
  builds tensors, numbers, containers and `_safe_globals()` and refuses any
  other object, so a hostile file cannot run code. `trust_pickle` loads with
  plain pickle, for a file from a source you trust that holds other objects.
  """
  import pickle  # pylint: disable=g-import-not-at-top

  torch = _import_torch()
  try:
    if trust_pickle:
      checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    else:
      with torch.serialization.safe_globals(_safe_globals()):
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # whatever a damaged file makes torch raise
    reason = validation.first_line(e) or type(e).__name__
    if isinstance(e, pickle.UnpicklingError) and not trust_pickle:
      raise ValueError(
          f'{path}: refused to unpickle it: it holds objects other than tensors, numbers, '
          f'numpy arrays and argparse args ({reason}); only if you trust where the file '
          'came from, pass --trust_pickle (this runs code the file names)'
      ) from e
    raise ValueError(f'{path}: not a readable PyTorch checkpoint ({reason})') from e
  if not isinstance(checkpoint, Mapping) or 'model_state_dict' not in checkpoint:
    raise ValueError(f'{path}: not a reference training checkpoint (no model_state_dict)')
  state_dict = _clean_state_dict(checkpoint['model_state_dict'], torch)
  bad = [k for k, v in state_dict.items() if v.dtype.kind == 'f' and not np.isfinite(v).all()]
  if bad:
    raise ValueError(
        f'{path}: non-finite weights (NaN or inf) in {", ".join(sorted(bad))}; '
        'the run that saved it had diverged: import an earlier checkpoint'
    )
  # The RL script saves its iteration as training_iteration.
  iteration = checkpoint.get('iteration', checkpoint.get('training_iteration'))
  args = checkpoint.get('args')
  return state_dict, None if args is None else _as_dict(args), iteration


def _json_safe(args: dict) -> dict:
  """The saved args that JSON can hold as they are (a record of the source run)."""
  return {
      k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, type(None), list))
  }


def import_checkpoint(
    checkpoint: str,
    workdir: str,
    task: str | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
    strict: bool = True,
    model_kwargs: dict | None = None,
) -> dict:
  """A reference model -> workdir/config.json + workdir/checkpoint. Returns the config.

  `checkpoint` is a training script's .pt, or a model the reference's Hub
  mixin wrote (interop/hub.py): `hf://ORG/NAME[@REVISION]`, a folder of
  config.json + model.safetensors, or a bare .safetensors (read without
  torch). `model_kwargs` give constructor kwargs the source lacks. Writes
  nothing when the import fails, and refuses an existing workdir/checkpoint
  unless `overwrite`. `strict=False` loads as torch's
  `load_state_dict(strict=False)` does (the reference's inference notebook):
  the config's `skipped` lists every ignored key and initialised variable.
  """
  import shutil  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from ctm_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  if task is not None and task not in tasks_lib.names():
    raise ValueError(f'--task={task!r} is unknown; expected one of {", ".join(tasks_lib.names())}')
  local = not hub.is_hub(checkpoint)
  if local:
    checkpoint = os.path.abspath(checkpoint)
  workdir = storage.resolve(workdir)
  ckpt_dir = storage.join(workdir, CHECKPOINT_DIR)
  outputs.claim(workdir, 'import', overwrite, '--workdir')  # never a training run or a foreign folder
  if local and not os.path.exists(checkpoint):
    raise FileNotFoundError(f'{checkpoint}: no such checkpoint file')
  iteration = None
  if hub.is_model_folder_or_file(checkpoint):
    config, state_dict = read_hub_model(checkpoint, task, model_kwargs)
  else:
    state_dict, args, iteration = load_reference_checkpoint(checkpoint, trust_pickle)
    if args is None and not model_kwargs:
      raise ValueError(
          f'{checkpoint}: the checkpoint saved no args; give the constructor kwargs with '
          '--model_kwargs=JSON or --model_kwargs=@FILE.json (its model card lists them; docs/import.md)'
      )
    if args is None:  # the community's checkpoints: kwargs from their model cards
      config = record_from_kwargs(model_kwargs, checkpoint, task)
    elif model_kwargs:
      raise ValueError(f'--model_kwargs: {checkpoint} saved its args; they give the kwargs')
    else:
      task = task or detect_task(args)
      config = {
          'task': task,
          'model_type': reference_model_type(args, task),
          'reference_args': _json_safe(args),
          'model_kwargs': model_kwargs_from_args(args, task),
      }
  model_class = tasks_lib.get(config['task']).model_class_for(config['model_type'])
  skipped = []
  _, variables = import_state_dict(state_dict, config['model_kwargs'], model_class, strict, skipped)  # raises before any write
  config = {
      'task': config['task'],
      'model_type': config['model_type'],
      'source_checkpoint': checkpoint,
      'iteration': iteration,
      **{k: v for k, v in config.items() if k not in ('task', 'model_type')},
      'strict': strict,
      'skipped': skipped,
  }
  storage.path(workdir).mkdir(parents=True, exist_ok=True)
  with workdir_lib.Lock(workdir):  # refused while a trainer or another import holds it
    outputs.claim(workdir, 'import', overwrite, '--workdir')  # again, now that no one else writes
    config_path = storage.path(storage.join(workdir, CONFIG_FILE))
    if config_path.exists():
      config_path.unlink()  # first: a half-replaced import is never taken for a complete one
    sums_path = storage.path(storage.join(workdir, manifest.FILE))
    if sums_path.exists():
      sums_path.unlink()
    if storage.path(ckpt_dir).exists():
      if storage.is_bucket(ckpt_dir):
        storage.remove(ckpt_dir)
      else:
        shutil.rmtree(ckpt_dir)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(ckpt_dir, variables)
    checkpointer.wait_until_finished()
    config_text = json.dumps(config, indent=1)
    sums = {f'{CHECKPOINT_DIR}/{name}': v for name, v in manifest.file_sums(ckpt_dir, read=True).items()}
    sums[CONFIG_FILE] = manifest.sum_of(config_text.encode())
    manifest.write(workdir, sums)
    # Written last, so a config.json means a complete import.
    storage.write_text(storage.join(workdir, CONFIG_FILE), config_text)
  return config


def read_hub_model(source: str, task: str | None = None, model_kwargs: dict | None = None):
  """(import record without its source, state_dict) of a model the reference's
  Hub mixin wrote: its task (from the kwargs, or `task`), its kwargs with
  the constructor's defaults filled in and listed under `defaults`."""
  kwargs, state_dict, _ = hub.read_model(source, model_kwargs)
  return record_from_kwargs(kwargs, source, task), state_dict


def record_from_kwargs(kwargs: dict, source: str, task: str | None = None) -> dict:
  """The import record of a CTM given by the reference constructor's
  `kwargs`: its task (from the kwargs, or `task`), the kwargs with the
  constructor's defaults filled in and listed under `defaults`; one-line
  ValueError naming a kwarg that is unknown or has no value."""
  # A task named by --task needs no reference script to read these: the kwargs
  # give the model, so a community task's checkpoint imports as the reference's do.
  task = tasks_lib.get(task).name if task else detect_task_from_kwargs(kwargs, source)
  model_class = tasks_lib.get(task).model_class_for('ctm')
  fields = {f.name: f for f in dataclasses.fields(model_class) if f.init and f.name not in ('parent', 'name')}
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(f'{source}: constructor kwarg {unknown[0]!r} is not one of the {task} model\'s')
  missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ValueError(
        f'{source}: no value for constructor kwarg {missing[0]!r}; give it with '
        f'--model_kwargs=\'{{"{missing[0]}": ...}}\''
    )
  defaults = {
      n: _json_default(f.default) for n, f in fields.items()
      if n not in kwargs and n not in ctm_lib.COMPUTE_FIELDS and f.default is not dataclasses.MISSING
  }
  return {
      'task': task,
      'model_type': 'ctm',
      'reference_args': {},
      'model_kwargs': {**kwargs, **defaults},
      'defaults': sorted(defaults),
  }


def _json_default(value):
  return list(value) if isinstance(value, tuple) else value


def detect_task_from_kwargs(kwargs: dict, source: str) -> str:
  """The task whose model the constructor `kwargs` build (a Hub model's
  config.json), or a ValueError naming --task."""
  importing = tasks_lib.with_part(tasks_lib.ImportsReference)
  found = [task.name for task in importing if task.matches_model_kwargs(kwargs)]
  if len(found) != 1:
    raise ValueError(
        f'{source}: cannot tell the task from its kwargs ('
        f'{"several match: " + ", ".join(found) if found else "no task recognises them"}); '
        f'pass --task, one of {", ".join(t.name for t in importing)}'
    )
  return found[0]


def load_imported(workdir: str, task: str | None = None):
  """(model, variables, config) of a workdir written by `import_checkpoint`,
  or of a model the reference's Hub mixin wrote (hf://, its folder; read
  in memory, as `task` when given).

  Variables land on the first local device; reshard them for training.
  """
  if hub.is_model_folder_or_file(workdir):
    record, state_dict = read_hub_model(workdir, task)
    model_class = tasks_lib.get(record['task']).model_class_for(record['model_type'])
    model, variables = import_state_dict(state_dict, record['model_kwargs'], model_class)
    record = {**record, 'source_checkpoint': workdir, 'iteration': None, 'strict': True, 'skipped': []}
    return model, variables, record
  workdir = storage.resolve(workdir)
  manifest.check(workdir, 'the import', f'import it again: python -m ctm_jax.interop.torch --workdir={workdir} --overwrite ...')
  config = json.loads(storage.path(storage.join(workdir, CONFIG_FILE)).read_text())
  model = tasks_lib.get(config['task']).model_from_kwargs(config.get('model_type', 'ctm'), config['model_kwargs'])
  # Target from the saved metadata, not its sharding: the writer's device may not exist here.
  variables = artefact.restore_variables(storage.join(workdir, CHECKPOINT_DIR))
  return model, variables, config


def _main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  flag_values = flags.FLAGS
  try:
    config = import_checkpoint(
        flag_values.checkpoint,
        flag_values.workdir,
        task=flag_values.task,
        overwrite=flag_values.overwrite,
        trust_pickle=flag_values.trust_pickle,
        strict=flag_values.strict,
        model_kwargs=hub.parse_model_kwargs(flag_values.model_kwargs),
    )
  except (ValueError, OSError, ImportError) as e:  # user errors: one line, not a traceback
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  workdir = storage.resolve(flag_values.workdir)
  print(f'imported {config["task"]} CTM from {config["source_checkpoint"]}')
  print(f'  config:     {storage.join(workdir, CONFIG_FILE)}')
  print(f'  checkpoint: {storage.join(workdir, CHECKPOINT_DIR)}')
  if config['skipped']:
    print(f'  not strict, {len(config["skipped"])} key(s) skipped:')
    for line in config['skipped']:
      print(f'    {line}')


def _define_flags():
  """Defined only when run as a script, so importing this module adds no flags."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string(
      'checkpoint', None,
      'A reference training checkpoint (.pt), a Hub model (hf://ORG/NAME[@REVISION]), a folder of '
      'config.json + model.safetensors, or a .safetensors file (with --model_kwargs).',
      required=True,
  )
  flags.DEFINE_string(
      'model_kwargs', None,
      'Constructor kwargs the checkpoint does not carry: a JSON object, or @FILE.json.',
  )
  flags.DEFINE_string('workdir', None, 'Directory for config.json and checkpoint/.', required=True)
  flags.DEFINE_string('task', None, 'Task override; default: detected from the saved args.')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing workdir/checkpoint.')
  flags.DEFINE_bool(
      'trust_pickle',
      False,
      'Unpickle the checkpoint with plain pickle, which runs any code the file names; '
      'only for a file from a source you trust (default: weights-only loading).',
  )
  flags.DEFINE_bool(
      'strict',
      True,
      'Every state_dict key must fill a variable and every variable be filled; '
      '--strict=false ignores unknown keys and initialises missing variables, listing each.',
  )


def run():
  """`ctm-import`, the same as `python -m ctm_jax.interop.torch`."""
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  app.run(_main)


if __name__ == '__main__':
  run()
