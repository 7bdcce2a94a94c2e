"""The Continuous Thought Machine: featurise once, then scan one tick T times.

Dimension glossary:
  B batch            T ticks (iterations)      D neurons (d_model)
  M memory length    H NLM hidden width        E d_input (attention width)
  N tokens           C backbone channels       P synchronisation size
  K attention heads  F head width (E / K)      O out_dims
"""

import dataclasses
import math
import re
from typing import Any, ClassVar, NamedTuple, Sequence

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import sharding
from ctm_jax.models import backbones
from ctm_jax.models import deferred
from ctm_jax.models import layers
from ctm_jax.models import nlm
from ctm_jax.models import posemb
from ctm_jax.models import synapse
from ctm_jax.models import synch

DECAY_CLAMP = (0.0, 15.0)
# Logical axes of (B, D) activations and of the neuron-major (D, B, M) trace;
# see ctm_jax/sharding.py.
_BATCH_NEURONS = ('batch', 'neurons')
_NEURONS_MEMORY_BATCH = ('neurons', None, 'batch')
# bf16 is an opt-in compute dtype; parameters and optimiser state stay float32.
COMPUTE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
DECAY_PARAM_NAMES = ('decay_params_action', 'decay_params_out')
# Options that change how the model computes, not its function or its weights:
# a run may resume, and an import or the reference may differ, in these.
COMPUTE_FIELDS = ('dtype', 'remat', 'backbone_remat', 'unroll', 'deferred_grads')
# The recurrent core, what `init_from_parts='core'` carries from one task's CTM
# to another's: synapses, NLMs, start states, synch decays and neuron pairs.
# The input side (backbone, positional embedding, kv / q projections,
# attention) and the output head stay the new task's own. CORE_FIELDS fix the
# core's shapes (the synapses read D + E: d_input is one).
CORE_FIELDS = ('d_model', 'd_input', 'memory_length', 'memory_hidden_dims', 'deep_nlms', 'do_layernorm_nlm',
               'synapse_depth', 'n_synch_out', 'n_synch_action', 'neuron_select_type')
_CORE_PARAMS = re.compile(
    r'^(start_activated_state|start_trace|decay_params_(out|action)|tick/(synapses_\d+|trace_processor_[^/]+))(/|$)'
)
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'sqrt': None,  # two-level: see ContinuousThoughtMachine._run_ticks_two_level
}
# The tick scan: parameters shared by every tick, a fresh dropout key per tick,
# per-tick inputs scanned, fixed inputs and synch parameters broadcast.
_TICK_SCAN = dict(
    variable_broadcast='params',
    # models/deferred.py: each tick's probes in, its recorded matmul inputs out.
    variable_axes={'probes': 0, 'deferred': 0},
    split_rngs={'params': False, 'dropout': True},
    in_axes=(0, nn.broadcast, nn.broadcast),
)


@flax.struct.dataclass
class Tracking:
  """Per-tick internals, the reference's `track=True` outputs (tick axis first)."""

  pre_activations: jax.Array  # (T, B, D)
  post_activations: jax.Array  # (T, B, D)
  attention: jax.Array | None  # (T, B, K, 1, N)
  synch_out: jax.Array  # (T, B, P_out)
  synch_action: jax.Array | None  # (T, B, P_action)
  # Inputs fed without attention, where a variant tracks them (Q&A-MNIST's
  # question embeddings): (T_question, B, E).
  embeddings: jax.Array | None = None


@flax.struct.dataclass
class CTMOutput:
  predictions: jax.Array  # (B, O, T)
  certainties: jax.Array  # (B, 2, T): [normalised entropy, 1 - it]
  synch_out: jax.Array  # (B, P_out), after the last tick
  tracking: Tracking | None = None


@flax.struct.dataclass
class EarlyExit:
  """Per-example early exit: each example's answer at the first tick whose
  certainty reached the threshold (or at the last tick allowed)."""

  predictions: jax.Array  # (B, O) at the stopping tick
  certainties: jax.Array  # (B, 2) at the stopping tick
  ticks: jax.Array  # (B,) int32: ticks used, 1-based
  stopped: jax.Array  # (B,) bool: whether the threshold was reached

  def as_output(self) -> 'CTMOutput':
    """The answers at the stopping ticks as a one-tick CTMOutput, for a
    task's `correct` and `loss`."""
    return CTMOutput(
        predictions=self.predictions[..., None],
        certainties=self.certainties[..., None],
        synch_out=None,
    )


@flax.struct.dataclass
class TickInputs:
  """What a tick reads from outside its carried state; None where unused.

  A model passes two of these to `run_ticks`: `per_tick`, whose fields carry a
  leading tick axis (T, ...) and are scanned, one slice per tick (Q&A-MNIST's
  tokens change every tick), and `fixed`, whose fields every tick sees whole
  (an image's keys and values). A field is set in at most one of the two.
  Attention reads `keys_BxKxNxF` / `values_BxKxNxF` (head-major, projected),
  or, when `key_set` (a () index, per tick) is given, that set of
  `key_sets_BxSxKxNxF` / `value_sets_BxSxKxNxF` (S inputs shown in turn); a
  model without attention feeds `features_BxE` straight to the synapses, and
  one that has both picks per tick with `attend` (a () bool). `active_B`
  ((B,) bool, per tick) False leaves an example's state as it was: a padded
  tick, for inputs shorter than the batch's longest. `key_mask_BxN` ((B, N)
  bool, fixed) False hides a key from the attention: padding, for sequences
  shorter than the batch's width.
  """

  keys_BxKxNxF: jax.Array | None = None
  values_BxKxNxF: jax.Array | None = None
  features_BxE: jax.Array | None = None
  key_sets_BxSxKxNxF: jax.Array | None = None
  value_sets_BxSxKxNxF: jax.Array | None = None
  key_set: jax.Array | None = None
  attend: jax.Array | None = None
  active_B: jax.Array | None = None
  key_mask_BxN: jax.Array | None = None

  def merge(self, fixed: 'TickInputs') -> 'TickInputs':
    """This tick's slice of the per-tick fields, the fixed ones elsewhere."""
    fields = {}
    for field in dataclasses.fields(self):
      mine, theirs = getattr(self, field.name), getattr(fixed, field.name)
      if mine is not None and theirs is not None:
        raise ValueError(f'TickInputs.{field.name} is given both per tick and fixed')
      fields[field.name] = mine if mine is not None else theirs
    return TickInputs(**fields)


  def keys_values(self):
    """This tick's (keys_BxKxNxF, values_BxKxNxF): the fixed ones, or the
    `key_set`-th of the key/value sets."""
    if self.key_set is not None:
      return (
          jnp.take(self.key_sets_BxSxKxNxF, self.key_set, axis=1),
          jnp.take(self.value_sets_BxSxKxNxF, self.key_set, axis=1),
      )
    return self.keys_BxKxNxF, self.values_BxKxNxF

  def attended_or_direct(self, attended_BxE):
    """The attention's output, or `features_BxE` on ticks that do not attend."""
    if self.attend is None:
      return attended_BxE
    return jnp.where(self.attend, attended_BxE, self.features_BxE.astype(attended_BxE.dtype))


def tick_count(per_tick, default: int) -> int:
  """Ticks of scanned inputs (their leading axis), `default` when there are none."""
  leaves = jax.tree.leaves(per_tick)
  return leaves[0].shape[0] if leaves else default


def hold(active_B, new, old, batch_axis: int):
  """`new` where `active_B` along every leaf's `batch_axis`, else `old`."""

  def select(n, o):
    shape = [1] * n.ndim
    shape[batch_axis] = n.shape[batch_axis]
    return jnp.where(active_B.reshape(shape), n, o)

  return jax.tree.map(select, new, old)

@flax.struct.dataclass
class SynchParams:
  """Neuron-pair indices (P,) and decay parameters (P,) of both synch sides;
  the action side is None when the model has no action synch."""

  out_left_P: jax.Array
  out_right_P: jax.Array
  decay_out_P: jax.Array
  action_left_P: jax.Array | None = None
  action_right_P: jax.Array | None = None
  decay_action_P: jax.Array | None = None


@flax.struct.dataclass
class Prepared:
  """A batch ready for its first tick (`__call__(x, prepare=True)`): what
  serving needs to run ticks itself (ctm_jax/serving.py)."""

  state: 'TickState'
  fixed: TickInputs
  synch_params: SynchParams


class TickState(NamedTuple):
  """What one tick hands to the next."""

  trace_DxMxB: jax.Array  # pre-activation history, newest last; the NLMs' layout
  z_BxD: jax.Array  # post-activations
  synch_action: synch.SynchState
  synch_out: synch.SynchState
  # Post-activation history, newest last, for variants that carry state across
  # calls and synchronise over a window (RL); None in the main class.
  z_trace_BxDxM: jax.Array | None = None


def certainty(prediction_BxO, prediction_reshaper: Sequence[int]):
  """[normalised entropy, 1 - normalised entropy] of one tick's prediction, (B, 2).

  The entropy is over the last axis of the reshaped prediction and averaged
  over any other non-batch axes.
  """
  batch = prediction_BxO.shape[0]
  logits = prediction_BxO.reshape((batch, *prediction_reshaper)).astype(jnp.float32)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
  ne = entropy / jnp.log(jnp.float32(logits.shape[-1]))
  if ne.ndim > 1:
    ne = ne.reshape(batch, -1).mean(-1)
  return jnp.stack([ne, 1 - ne], axis=-1)


def _xavier_qkv(d_input: int):
  # torch xavier_uniform_ on the packed (3E, E) in_proj matrix.
  return layers.uniform(math.sqrt(6.0 / (4 * d_input)))


def push(history, new, axis: int = -1):
  """Drops the oldest entry of a history along `axis` (newest last) and appends
  `new`, the history's shape without that axis."""
  new = jnp.expand_dims(new, axis).astype(history.dtype)
  oldest_dropped = jax.lax.slice_in_dim(history, 1, None, axis=axis)
  return jnp.concatenate([oldest_dropped, new], axis)


def _split_heads(x_BxNxE, heads):
  return x_BxNxE.reshape(*x_BxNxE.shape[:-1], heads, x_BxNxE.shape[-1] // heads)


class Tick(nn.Module):
  """One internal tick; `nn.scan` runs it with parameters broadcast over ticks.

  Per tick: synch-action -> query -> cross-attention (or a direct input when
  heads == 0) -> synapse -> trace shift -> NLMs -> synch-out -> prediction and
  certainty. Inputs: `per_tick` (this tick's slice of the scanned
  `TickInputs`), `fixed` (the broadcast `TickInputs`) and `synch` (the
  broadcast `SynchParams`).
  """

  d_model: int
  d_input: int
  heads: int
  synapse_depth: int
  deep_nlms: bool
  memory_hidden_dims: int
  do_layernorm_nlm: bool
  out_dims: int
  prediction_reshaper: tuple[int, ...]
  dropout: float
  dropout_nlm: float
  train: bool = False
  track: bool = False
  dtype: Any = jnp.float32
  # The heavy matmuls leave their weight gradients to models/deferred.py.
  defer: bool = False

  @nn.compact
  def __call__(
      self, state: TickState, per_tick: TickInputs, fixed: TickInputs, synch_params: SynchParams
  ):
    inputs = per_tick.merge(fixed)
    z_BxD = state.z_BxD
    outputs = {}
    synch_action_state = state.synch_action
    if self.heads:
      synch_action_BxP, synch_action_state = synch.update(
          state.synch_action,
          z_BxD,
          synch_params.action_left_P,
          synch_params.action_right_P,
          synch_params.decay_action_P,
      )
      q_BxE = layers.Linear(self.d_input, dtype=self.dtype, defer=self.defer, name='q_proj')(
          synch_action_BxP
      )
      features_BxE, attention_BxKxN = self._attend(q_BxE, inputs)
      features_BxE = inputs.attended_or_direct(features_BxE)
      if self.track:
        outputs['synch_action'] = synch_action_BxP
        outputs['attention'] = attention_BxKxN[:, :, None, :]
    else:
      features_BxE = inputs.features_BxE
      if features_BxE is None:
        raise ValueError('a tick without attention needs TickInputs.features_BxE')

    synapse_in = jnp.concatenate([features_BxE.astype(self.dtype), z_BxD.astype(self.dtype)], -1)
    if self.synapse_depth == 1:
      pre_BxD = synapse.mlp_synapse(
          synapse_in, self.d_model, self.dropout, self.train, self.dtype, self.defer
      )
    else:
      pre_BxD = synapse.SynapseUNet(
          self.d_model,
          self.synapse_depth,
          self.dropout,
          dtype=self.dtype,
          defer=self.defer,
          name='synapses',
      )(synapse_in, self.train)
    trace_DxMxB = sharding.constrain(
        push(state.trace_DxMxB, pre_BxD.T, axis=1), _NEURONS_MEMORY_BATCH
    )
    z_DxB = nlm.neuron_level_models(
        trace_DxMxB,
        deep=self.deep_nlms,
        memory_hidden_dims=self.memory_hidden_dims,
        do_norm=self.do_layernorm_nlm,
        dropout=self.dropout_nlm,
        train=self.train,
        dtype=self.dtype,
        defer=self.defer,
        # Held examples keep their trace: then it is no sliding history.
        window=inputs.active_B is None,
    )
    z_BxD = sharding.constrain(z_DxB.T.astype(state.z_BxD.dtype), _BATCH_NEURONS)
    synch_out_BxP, synch_out_state = synch.update(
        state.synch_out,
        z_BxD,
        synch_params.out_left_P,
        synch_params.out_right_P,
        synch_params.decay_out_P,
    )
    prediction_BxO = layers.Linear(
        self.out_dims, dtype=self.dtype, defer=self.defer, name='output_projector_0'
    )(synch_out_BxP)
    prediction_BxO = prediction_BxO.astype(jnp.float32)
    outputs['predictions'] = prediction_BxO
    outputs['certainties'] = certainty(prediction_BxO, self.prediction_reshaper)
    if self.track:
      outputs['synch_out'] = synch_out_BxP
      outputs['pre_activations'] = pre_BxD
      outputs['post_activations'] = z_BxD
    z_trace_BxDxM = state.z_trace_BxDxM
    if z_trace_BxDxM is not None:
      z_trace_BxDxM = push(z_trace_BxDxM, z_BxD)
    next_state = TickState(trace_DxMxB, z_BxD, synch_action_state, synch_out_state, z_trace_BxDxM)
    if inputs.active_B is not None:
      next_state = hold_inactive(inputs.active_B, next_state, state)
    return next_state, outputs

  def _attend(self, q_BxE, inputs: TickInputs):
    k_BxKxNxF, v_BxKxNxF = inputs.keys_values()
    if k_BxKxNxF is None or v_BxKxNxF is None:
      raise ValueError('an attending tick needs TickInputs.keys_BxKxNxF and values_BxKxNxF')
    return attend(self, q_BxE, k_BxKxNxF, v_BxKxNxF, inputs.key_mask_BxN)


def hold_inactive(active_B, new: TickState, old: TickState) -> TickState:
  """`new` where `active_B`, else `old`: an inactive example's tick is a no-op."""
  fields = new._asdict()
  for name, value in fields.items():
    if value is not None:  # the neuron-major trace has its batch on axis 1
      fields[name] = hold(active_B, value, getattr(old, name), 2 if name == 'trace_DxMxB' else 0)
  return TickState(**fields)


def attend(module, q_BxE, k_BxKxNxF, v_BxKxNxF, key_mask_BxN=None):
  """Single-query multi-head attention over pre-projected keys/values, its
  query projection and output projection (`attention_q`, `attention_out`)
  created in `module` (which has d_input, heads, dropout, train, dtype);
  keys where `key_mask_BxN` is False get no weight.
  Returns (out_BxE, weights_BxKxN)."""
  head_dim = module.d_input // module.heads
  q_BxE = layers.Linear(
      module.d_input,
      kernel_init=_xavier_qkv(module.d_input),
      bias_init=nn.initializers.zeros,
      dtype=module.dtype,
      defer=getattr(module, 'defer', False),
      name='attention_q',
  )(q_BxE)
  q_BxKxF = _split_heads(q_BxE, module.heads) * math.sqrt(1.0 / head_dim)
  # b: batch, k: head, f: head feature, n: token.
  scores_BxKxN = jnp.einsum('bkf,bknf->bkn', q_BxKxF, k_BxKxNxF.astype(module.dtype))
  weights_BxKxN = jax.nn.softmax(scores_BxKxN.astype(jnp.float32), axis=-1,
                                 where=None if key_mask_BxN is None else key_mask_BxN[:, None, :])
  dropped_BxKxN = nn.Dropout(module.dropout, deterministic=not module.train)(weights_BxKxN)
  out_BxKxF = jnp.einsum(
      'bkn,bknf->bkf', dropped_BxKxN.astype(module.dtype), v_BxKxNxF.astype(module.dtype)
  )
  out_BxE = layers.Linear(
      module.d_input,
      bias_init=nn.initializers.zeros,
      dtype=module.dtype,
      defer=getattr(module, 'defer', False),
      name='attention_out',
  )(out_BxKxF.reshape(q_BxE.shape))
  return out_BxE, weights_BxKxN


class ContinuousThoughtMachine(nn.Module):
  """The CTM (arXiv 2505.05522), with the reference's constructor options.

  `__call__(x, train=False, track=False)` takes a batch of inputs: (B, L) of
  +-1 for `parity_backbone`, NHWC images for ResNet / shallow-wide backbones,
  and (B, N, C) or (B, H, W, C) features for backbone 'none'. It returns a
  `CTMOutput`. Variables: `params`, `synch` (neuron-pair indices, drawn from
  the `params` key at init, never optimised) and `batch_stats` (ResNet /
  shallow-wide). Dropout draws from the `dropout` rng in training.

  Extra options (not in the reference): `remat` ('none' | 'full' | 'dots')
  checkpoints the tick body, 'sqrt' chunks of ~sqrt(T) ticks (memory grows
  as sqrt(T)); `dtype` is the compute dtype (parameters stay float32);
  `unroll` is the scan unroll factor; `deferred_grads` computes the tick
  loop's weight gradients once after the backward scan (models/deferred.py;
  the same gradients, remat 'none', 'full' or 'dots'); `backbone_remat`
  rematerialises a ResNet backbone per residual block (backbones.BACKBONE_REMAT).
  """

  iterations: int
  d_model: int
  d_input: int
  heads: int
  n_synch_out: int
  n_synch_action: int
  synapse_depth: int
  memory_length: int
  deep_nlms: bool
  memory_hidden_dims: int
  do_layernorm_nlm: bool
  backbone_type: str
  positional_embedding_type: str
  out_dims: int
  prediction_reshaper: Sequence[int] = (-1,)
  dropout: float = 0.0
  dropout_nlm: float | None = None
  neuron_select_type: str = 'random-pairing'
  n_random_pairing_self: int = 0
  remat: str = 'none'
  dtype: Any = jnp.float32
  unroll: int = 1
  deferred_grads: bool = False
  backbone_remat: str = 'none'

  # Variants that feed their input straight to the synapses (sort, RL) set
  # this False and may use heads = n_synch_action = 0.
  attends: ClassVar[bool] = True
  # The main class clamps the synch decays in place, outside autograd (the
  # trainer projects them after each update: project_decay_params); sort and
  # RL clamp inside the graph, so a decay outside [0, 15] gets no gradient.
  decay_clamp_in_graph: ClassVar[bool] = False

  def __post_init__(self):
    object.__setattr__(self, 'prediction_reshaper', tuple(self.prediction_reshaper))
    if isinstance(self.remat, bool):
      object.__setattr__(self, 'remat', 'full' if self.remat else 'none')
    validate_config(self)
    object.__setattr__(self, 'dtype', jnp.dtype(self.dtype))  # 'bfloat16' == jnp.bfloat16
    super().__post_init__()

  @property
  def synch_size_out(self) -> int:
    return synch.synch_size(self.neuron_select_type, self.n_synch_out)

  @property
  def synch_size_action(self) -> int:
    return synch.synch_size(self.neuron_select_type, self.n_synch_action)

  def make_tick(self, track: bool = False) -> 'Tick':
    """The inference tick, unbound: apply it with `{'params': params['tick']}`
    to (state, TickInputs(), prepared.fixed, prepared.synch_params); with
    `track`, its outputs carry the attention too."""
    return Tick(**self._tick_kwargs(False, track), parent=None)

  def _tick_kwargs(self, train, track):
    return dict(
        d_model=self.d_model,
        d_input=self.d_input,
        heads=self.heads,
        synapse_depth=self.synapse_depth,
        deep_nlms=self.deep_nlms,
        memory_hidden_dims=self.memory_hidden_dims,
        do_layernorm_nlm=self.do_layernorm_nlm,
        out_dims=self.out_dims,
        prediction_reshaper=self.prediction_reshaper,
        dropout=self.dropout,
        dropout_nlm=self.dropout if self.dropout_nlm is None else self.dropout_nlm,
        train=train,
        track=track,
        dtype=self.dtype,
    )

  @nn.compact
  def __call__(
      self,
      x,
      train: bool = False,
      track: bool = False,
      exit_threshold: float | jax.Array | None = None,
      max_ticks: int | None = None,
      prepare: bool = False,
  ) -> CTMOutput | EarlyExit | Prepared:
    """All ticks (a CTMOutput); or, with `exit_threshold`, per-example early
    exit (an EarlyExit, inference only): ticks run until every example has had
    a tick with certainty >= the threshold, or `max_ticks` (default
    `iterations`; more than trained is allowed) have run; or, with `prepare`,
    no tick at all: the initial state and the tick inputs (a Prepared), for
    callers that run the ticks themselves with `make_tick()`."""
    self.check_input(x)
    per_tick, fixed = self.tick_inputs(x, train)
    synch_params = self.synch_params()
    state = self.initial_state(jax.tree.leaves(x)[0].shape[0], synch_params)
    if prepare:
      if jax.tree.leaves(per_tick):
        raise ValueError(f'{type(self).__name__} reads inputs that change over the ticks; serving needs fixed ones')
      return Prepared(state, fixed, synch_params)
    if exit_threshold is not None:
      return self.run_until_certain(
          state, per_tick, fixed, synch_params, exit_threshold, max_ticks or self.iterations
      )
    final, per_tick_out = self.run_ticks(state, per_tick, fixed, synch_params, train=train, track=track)
    return self.outputs(final, per_tick_out, track, per_tick)

  def check_input(self, x) -> None:
    """Raises ValueError for an input the model cannot take (variants override)."""
    validate_input(self, x)

  def tick_inputs(self, x, train) -> tuple[TickInputs, TickInputs]:
    """(per-tick, fixed) TickInputs of a batch: here the attention's keys and
    values, computed once (backbone, positional embedding, projections)."""
    k_BxKxNxF, v_BxKxNxF = self.project_kv(self.featurise(x, train))
    return TickInputs(), TickInputs(keys_BxKxNxF=k_BxKxNxF, values_BxKxNxF=v_BxKxNxF)

  def run_until_certain(
      self, state, per_tick: TickInputs, fixed, synch_params, threshold, max_ticks: int
  ) -> EarlyExit:
    """Ticks in a while loop with a per-example done mask; the loop ends when
    every example is done, so a batch of easy examples costs few ticks.

    An example's outputs freeze at its stopping tick; the others in the batch
    never change them (each example's ticks depend on its own state only).
    `per_tick` inputs are not supported (tick counts vary).
    """
    if jax.tree.leaves(per_tick):
      raise ValueError('early exit needs inputs fixed over ticks (no per-tick inputs)')
    if self.is_initializing():
      raise ValueError('early exit runs trained variables: initialise with a plain call')
    batch = state.z_BxD.shape[0]
    tick = Tick(**self._tick_kwargs(False, False), name='tick')
    threshold = jnp.asarray(threshold, jnp.float32)

    def cond(_, carry):
      t, _, done_B, *_ = carry
      return (t < max_ticks) & ~jnp.all(done_B)

    def body(module, carry):
      t, state, done_B, pred_BxO, cert_Bx2, ticks_B, stopped_B = carry
      state, out = module(state, TickInputs(), fixed, synch_params)
      sure_B = out['certainties'][:, 1] >= threshold
      last = t + 1 >= max_ticks
      now_B = ~done_B & (sure_B | last)
      pred_BxO = jnp.where(now_B[:, None], out['predictions'], pred_BxO)
      cert_Bx2 = jnp.where(now_B[:, None], out['certainties'], cert_Bx2)
      ticks_B = jnp.where(now_B, t + 1, ticks_B)
      stopped_B = stopped_B | (~done_B & sure_B)
      return t + 1, state, done_B | now_B, pred_BxO, cert_Bx2, ticks_B, stopped_B

    init = (
        jnp.zeros((), jnp.int32),
        state,
        jnp.zeros((batch,), bool),
        jnp.zeros((batch, self.out_dims), jnp.float32),
        jnp.zeros((batch, 2), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), bool),
    )
    _, _, _, pred_BxO, cert_Bx2, ticks_B, stopped_B = nn.while_loop(cond, body, tick, init)
    return EarlyExit(pred_BxO, cert_Bx2, ticks_B, stopped_B)

  # --- Pieces shared with the model variants (models/<variant>.py) -----------
  # A variant overrides __call__ and composes: featurise / project_kv (tokens
  # once, outside the loop), synch_params, initial_state, run_ticks with its
  # TickInputs (per tick or fixed), outputs.

  def featurise(self, x, train):
    """Tokens (B, N, E) after backbone, positional embedding and kv_proj."""
    return featurise(self, x, train)

  def project_kv(self, kv_BxNxE):
    """The attention's key/value projections, hoisted out of the tick loop."""
    return project_kv(self, kv_BxNxE)

  def synch_params(self) -> SynchParams:
    """Pair indices (P,) and decay parameters (P,) for both synch sides."""
    fields = {}
    sides = [('out', self.n_synch_out, self.synch_size_out)]
    if self.synch_size_action:
      sides.append(('action', self.n_synch_action, self.synch_size_action))
    for side, n_synch, size in sides:
      key = self.make_rng('params') if self.is_initializing() else None
      left_right = (
          synch.init_neuron_indices(
              key, self.neuron_select_type, side, self.d_model, n_synch, self.n_random_pairing_self
          )
          if key is not None
          else None
      )
      left = self.variable('synch', f'{side}_neuron_indices_left', lambda: left_right[0])
      right = self.variable('synch', f'{side}_neuron_indices_right', lambda: left_right[1])
      fields[f'{side}_left_P'], fields[f'{side}_right_P'] = synch.pair_indices(
          self.neuron_select_type, left.value, right.value
      )
      decay_P = self.param(f'decay_params_{side}', nn.initializers.zeros, (size,))
      fields[f'decay_{side}_P'] = clamp_in_graph(decay_P) if self.decay_clamp_in_graph else decay_P
    return SynchParams(**fields)

  def initial_state(self, batch: int, synch_params: SynchParams) -> TickState:
    d, m = self.d_model, self.memory_length
    start_z_D = self.param(
        'start_activated_state',
        sharding.with_axes(layers.uniform(math.sqrt(1 / d)), ('neurons',)), (d,),
    )
    start_trace_DxM = self.param(
        'start_trace',
        sharding.with_axes(layers.uniform(math.sqrt(1 / (d + m))), ('neurons', None)), (d, m),
    )
    z_BxD = sharding.constrain(jnp.broadcast_to(start_z_D, (batch, d)), _BATCH_NEURONS)
    trace_DxMxB = sharding.constrain(
        jnp.broadcast_to(start_trace_DxM[:, :, None], (d, m, batch)), _NEURONS_MEMORY_BATCH
    )
    # The output synch starts from z0 before the first tick; the action synch
    # starts empty (its first update sees z0).
    _, synch_out = synch.update(
        synch.zero_state(batch, self.synch_size_out),
        z_BxD,
        synch_params.out_left_P,
        synch_params.out_right_P,
        synch_params.decay_out_P,
    )
    synch_action = synch.zero_state(batch, self.synch_size_action)
    return TickState(trace_DxMxB, z_BxD, synch_action, synch_out)

  def run_ticks(
      self,
      state: TickState,
      per_tick: TickInputs,
      fixed: TickInputs,
      synch_params: SynchParams,
      *,
      train: bool,
      track: bool,
      length: int | None = None,
  ):
    """Scans the tick `length` times (default: the ticks of `per_tick`, else
    `iterations`); per-tick outputs stacked on axis 0.

    `per_tick`'s fields have a leading axis of `length` ticks; `fixed`'s are
    the same for every tick.
    """
    length = length or tick_count(per_tick, self.iterations)
    for name, leaf in jax.tree_util.tree_leaves_with_path(per_tick):
      if leaf.shape[0] != length:
        raise ValueError(
            f'per-tick input {jax.tree_util.keystr(name)} has {leaf.shape[0]} ticks, not {length}'
        )
    args = (state, per_tick, fixed, synch_params)
    if self.remat == 'sqrt':
      return self._run_ticks_two_level(*args, train=train, track=track, length=length)
    tick_cls = Tick
    if self.remat != 'none':
      tick_cls = nn.remat(Tick, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    scan = nn.scan(tick_cls, length=length, unroll=self.unroll, **_TICK_SCAN)
    if self.is_initializing():
      return scan(**self._tick_kwargs(train, track), name='tick')(*args)
    rngs = {'dropout': self.make_rng('dropout')} if train and self.has_rng('dropout') else {}
    if self.deferred_grads:
      return deferred.scan(
          scan(**self._tick_kwargs(train, track), parent=None),
          scan(**self._tick_kwargs(train, track), defer=True, parent=None),
          self.variables['params']['tick'],
          args,
          rngs,
          history_of=lambda args: args[0].trace_DxMxB,
      )
    # The NLMs' weights in their matmuls' layouts once, outside the loop.
    hoisted = nlm.hoist(self.variables['params']['tick'], self.dtype)
    return scan(**self._tick_kwargs(train, track), parent=None).apply(
        {'params': hoisted}, *args, rngs=rngs
    )

  def _run_ticks_two_level(self, state, xs, fixed, synch_params, *, train, track, length):
    """remat='sqrt': an outer scan over chunks of ~sqrt(T) ticks, each chunk rematerialised.

    Every tick is rematerialised too, so the backward pass holds the states at
    chunk starts, one chunk's states and one tick's residuals: memory grows as
    sqrt(T), for two extra forwards. Parameters stay under 'tick', as with the
    flat scan.
    """
    chunk, n_chunks, rest = sqrt_remat_chunks(length)
    tick = nn.remat(Tick, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)(
        **self._tick_kwargs(train, track), name='tick'
    )

    def run(module, carry, xs_tick, fixed, synch_params):
      return module(carry, xs_tick, fixed, synch_params)

    def scan_ticks(n):
      return nn.scan(run, length=n, unroll=min(self.unroll, n), **_TICK_SCAN)

    def run_chunk(module, carry, xs_chunk, fixed, synch_params):
      return scan_ticks(chunk)(module, carry, xs_chunk, fixed, synch_params)

    outer = nn.scan(nn.remat(run_chunk, prevent_cse=False), length=n_chunks, **_TICK_SCAN)
    split = n_chunks * chunk
    xs_chunks = jax.tree.map(lambda a: a[:split].reshape(n_chunks, chunk, *a.shape[1:]), xs)
    state, per_tick = outer(tick, state, xs_chunks, fixed, synch_params)
    per_tick = jax.tree.map(lambda a: a.reshape(split, *a.shape[2:]), per_tick)
    if rest:
      xs_rest = jax.tree.map(lambda a: a[split:], xs)
      state, per_tick_rest = scan_ticks(rest)(tick, state, xs_rest, fixed, synch_params)
      per_tick = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), per_tick, per_tick_rest)
    return state, per_tick

  def outputs(self, final: TickState, per_tick, track: bool, inputs: TickInputs | None = None) -> CTMOutput:
    """The CTMOutput of the scan's per-tick outputs; `inputs` are the scanned
    TickInputs, for variants whose tracking depends on them."""
    del inputs
    tracking = None
    if track:
      tracking = Tracking(
          pre_activations=per_tick['pre_activations'],
          post_activations=per_tick['post_activations'],
          attention=per_tick.get('attention'),
          synch_out=per_tick['synch_out'],
          synch_action=per_tick.get('synch_action'),
      )
    predictions_BxOxT = jnp.transpose(per_tick['predictions'], (1, 2, 0))
    certainties_Bx2xT = jnp.transpose(per_tick['certainties'], (1, 2, 0))
    # The reference's output layout, which losses, evaluators and export read.
    batch, _, ticks = predictions_BxOxT.shape
    chex.assert_shape(certainties_Bx2xT, (batch, 2, ticks))
    return CTMOutput(
        predictions=predictions_BxOxT,
        certainties=certainties_Bx2xT,
        # From the final state rather than stacked per tick: the same values,
        # without a (T, B, P) output.
        synch_out=synch.synchronisation(final.synch_out),
        tracking=tracking,
    )


def initial_rgb(module, x_BxHxWxC):
  """The 1x1 conv to 3 channels before a ResNet (torch LazyConv2d(3, 1) with
  bias), `initial_rgb` in `module`."""
  return nn.Conv(
      3,
      (1, 1),
      kernel_init=layers.torch_kernel_init,
      bias_init=layers.torch_bias_init(x_BxHxWxC.shape[-1]),
      dtype=module.dtype,
      name='initial_rgb',
  )(x_BxHxWxC)


def featurise(module, x, train):
  """Tokens (B, N, E) after backbone, positional embedding and kv_proj, created
  in `module` (which has backbone_type, positional_embedding_type, d_input, dtype)."""
  if 'resnet' in module.backbone_type:
    x = initial_rgb(module, x)
  backbone = backbones.make_backbone(
      module.backbone_type,
      module.d_input,
      module.dtype,
      remat=getattr(module, 'backbone_remat', 'none'),
      name='backbone',
  )
  features = x if backbone is None else backbone(x, train=train)
  pe = posemb.make_positional_embedding(
      module.positional_embedding_type,
      backbones.backbone_channels(module.backbone_type, module.d_input, x.shape[-1]),
      module.dtype,
      name='positional_embedding',
  )
  if pe is not None:
    features = features + pe(features)
  tokens_BxNxC = features.reshape(features.shape[0], -1, features.shape[-1])
  kv_BxNxE = layers.Linear(module.d_input, dtype=module.dtype, name='kv_proj_0')(tokens_BxNxC)
  return layers.LayerNorm(dtype=module.dtype, name='kv_proj_1')(kv_BxNxE)


def project_kv(module, kv_BxNxE):
  """The attention's key/value projections (`attention_k`, `attention_v`) in
  `module`, head-major (B, K, N, F): hoisted out of the tick loop."""

  def proj(name):
    y = layers.Linear(
        module.d_input,
        kernel_init=_xavier_qkv(module.d_input),
        bias_init=nn.initializers.zeros,
        dtype=module.dtype,
        name=name,
    )(kv_BxNxE)
    # Head-major once here, so the per-tick attention reads keys and values
    # without a transpose in either pass.
    return jnp.swapaxes(_split_heads(y, module.heads), 1, 2)

  return proj('attention_k'), proj('attention_v')


def sqrt_remat_chunks(length: int) -> tuple[int, int, int]:
  """remat='sqrt' runs n_chunks rematerialised chunks of `chunk` ticks, then `rest` plain ticks."""
  chunk = math.isqrt(length - 1) + 1  # ceil(sqrt(T))
  return chunk, length // chunk, length % chunk


def _error(field, value, why):
  return ValueError(f'{field}={value!r}: {why}')


def validate_config(m: ContinuousThoughtMachine) -> None:
  """Raises ValueError naming the first invalid option; called at construction."""
  positive = (
      'iterations',
      'd_model',
      'd_input',
      'n_synch_out',
      'synapse_depth',
      'memory_length',
      'out_dims',
  )
  for field in positive:
    value = getattr(m, field)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise _error(field, value, 'must be a positive integer')
  for field in ('heads', 'n_synch_action', 'n_random_pairing_self'):
    value = getattr(m, field)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
      raise _error(field, value, 'must be a non-negative integer')
  if m.deep_nlms and (
      not isinstance(m.memory_hidden_dims, (int, np.integer)) or m.memory_hidden_dims < 1
  ):
    raise _error(
        'memory_hidden_dims', m.memory_hidden_dims, 'must be a positive integer when deep_nlms=True'
    )
  if m.backbone_type not in backbones.BACKBONE_TYPES:
    raise _error(
        'backbone_type',
        m.backbone_type,
        f'unknown; expected one of {list(backbones.BACKBONE_TYPES)}',
    )
  if m.positional_embedding_type not in posemb.POSITIONAL_EMBEDDING_TYPES:
    raise _error(
        'positional_embedding_type',
        m.positional_embedding_type,
        f'unknown; expected one of {list(posemb.POSITIONAL_EMBEDDING_TYPES)}',
    )
  if m.backbone_type == 'none' and m.positional_embedding_type != 'none':
    raise _error(
        'positional_embedding_type',
        m.positional_embedding_type,
        "backbone_type='none' takes no positional embedding; use 'none'",
    )
  if m.neuron_select_type not in synch.NEURON_SELECT_TYPES:
    raise _error(
        'neuron_select_type',
        m.neuron_select_type,
        f'unknown; expected one of {list(synch.NEURON_SELECT_TYPES)}',
    )
  if m.neuron_select_type == 'first-last' and m.d_model < m.n_synch_out + m.n_synch_action:
    raise _error(
        'd_model',
        m.d_model,
        f"'first-last' needs d_model >= n_synch_out + n_synch_action "
        f'= {m.n_synch_out + m.n_synch_action}',
    )
  if m.neuron_select_type == 'random-pairing':
    for field in ('n_synch_out', 'n_synch_action'):
      if getattr(m, field) and m.n_random_pairing_self >= getattr(m, field):
        raise _error(
            'n_random_pairing_self',
            m.n_random_pairing_self,
            f"'random-pairing' needs n_random_pairing_self < {field} " f'= {getattr(m, field)}',
        )
  if m.attends and m.heads < 1:
    raise _error('heads', m.heads, 'the CTM attends to its input; heads must be >= 1')
  if m.attends and m.n_synch_action < 1:
    raise _error(
        'n_synch_action',
        m.n_synch_action,
        'the attention query is projected from the action synch; must be >= 1',
    )
  if not m.attends and m.heads:
    raise _error('heads', m.heads, f'{type(m).__name__} feeds its input directly; use 0')
  if m.heads and m.d_input % m.heads:
    raise _error('d_input', m.d_input, f'must be divisible by heads={m.heads}')
  for field in ('dropout', 'dropout_nlm'):
    value = getattr(m, field)
    if value is not None and not 0 <= value < 1:
      raise _error(field, value, 'must be in [0, 1)')
  if m.remat not in REMAT_POLICIES:
    raise _error('remat', m.remat, f'expected one of {list(REMAT_POLICIES)}')
  if m.backbone_remat not in backbones.BACKBONE_REMAT:
    raise _error(
        'backbone_remat', m.backbone_remat, f'expected one of {list(backbones.BACKBONE_REMAT)}'
    )
  if not isinstance(m.deferred_grads, bool):
    raise _error('deferred_grads', m.deferred_grads, 'must be True or False')
  if m.deferred_grads and m.remat == 'sqrt':
    raise _error(
        'deferred_grads',
        m.deferred_grads,
        "records every tick's matmul inputs, which remat='sqrt' does not keep; "
        "use remat 'none', 'full' or 'dots', or deferred_grads=False",
    )
  try:
    dtype = jnp.dtype(m.dtype)
  except TypeError:
    dtype = None
  if dtype not in COMPUTE_DTYPES:
    raise _error('dtype', str(m.dtype), f'expected one of {[d.name for d in COMPUTE_DTYPES]}')
  if not isinstance(m.unroll, int) or isinstance(m.unroll, bool) or m.unroll < 1:
    raise _error('unroll', m.unroll, 'must be a positive integer')
  reshaper = m.prediction_reshaper
  if not reshaper or sum(d == -1 for d in reshaper) > 1 or any(d == 0 or d < -1 for d in reshaper):
    raise _error(
        'prediction_reshaper', list(reshaper), 'must be positive sizes with at most one -1'
    )
  known = int(np.prod([d for d in reshaper if d != -1]))
  if (-1 in reshaper and m.out_dims % known) or (-1 not in reshaper and known != m.out_dims):
    raise _error('prediction_reshaper', list(reshaper), f'does not match out_dims={m.out_dims}')


def validate_input(m: ContinuousThoughtMachine, x) -> None:
  """Raises ValueError for an input the configured backbone cannot take."""
  shape, dtype = tuple(x.shape), jnp.dtype(x.dtype)
  if m.backbone_type == 'parity_backbone':
    if len(shape) != 2:
      raise _error('x.shape', shape, "backbone_type='parity_backbone' takes (B, L) of +-1")
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
      raise _error('x.dtype', str(dtype), 'parity inputs must be real numbers (+-1)')
    return
  if not jnp.issubdtype(dtype, jnp.floating):
    raise _error('x.dtype', str(dtype), f'backbone_type={m.backbone_type!r} takes floats')
  if m.backbone_type == 'none':
    if len(shape) not in (3, 4):
      raise _error(
          'x.shape', shape, "backbone_type='none' takes tokens (B, N, C) or a map (B, H, W, C)"
      )
    return
  if len(shape) != 4:
    raise _error('x.shape', shape, f'backbone_type={m.backbone_type!r} takes NHWC images')
  if m.positional_embedding_type == 'custom-rotational' and shape[1] != shape[2]:
    raise _error(
        'x.shape',
        shape,
        "positional_embedding_type='custom-rotational' needs square images (H == W)",
    )


def clamp_in_graph(decay_P, limits=DECAY_CLAMP):
  """clip(decay, *limits) with torch.clamp's gradient: 1 inside the range,
  its ends included, and 0 outside (jnp.clip would halve it at the ends)."""
  low, high = limits
  inside_P = (decay_P >= low) & (decay_P <= high)
  return jnp.where(inside_P, decay_P, jax.lax.stop_gradient(jnp.clip(decay_P, low, high)))


def project_decay_params(params):
  """Clamps every `decay_params_*` leaf to [0, 15]; other leaves pass through.

  The reference clamps these in place before each forward, outside autograd.
  Apply this after every optimiser update (and on import) so that the forward
  can use the parameters as they are and gradients match the reference.
  """

  def project(path, leaf):
    name = getattr(path[-1], 'key', None)
    if name in DECAY_PARAM_NAMES:
      return jnp.clip(leaf, *DECAY_CLAMP)
    return leaf

  return jax.tree_util.tree_map_with_path(project, params)


def is_core(name: str) -> bool:
  """Whether the variable `name` ('params/tick/synapses_1/kernel', 'synch/...')
  is part of the recurrent core (CORE_FIELDS)."""
  collection, _, rest = name.partition('/')
  return collection == 'synch' or (collection == 'params' and bool(_CORE_PARAMS.match(rest)))


def with_core(fresh, source):
  """`fresh` variables with every core leaf taken from `source` (another
  task's CTM); ValueError (one line) naming a core leaf `source` lacks or
  holds in another shape."""
  found = flax.traverse_util.flatten_dict(flax.core.unfreeze(source), sep='/')

  def pick(path, leaf):
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    if not is_core(name):
      return leaf
    if name not in found:
      raise ValueError(f'{name}: the source model has no such core variable (its core differs)')
    if tuple(np.shape(found[name])) != tuple(np.shape(leaf)):
      raise ValueError(
          f'{name}: {tuple(np.shape(found[name]))} in the source model, {tuple(np.shape(leaf))} here '
          f'(the cores differ in {", ".join(CORE_FIELDS)})'
      )
    return jnp.asarray(found[name], leaf.dtype)

  return jax.tree_util.tree_map_with_path(pick, flax.core.unfreeze(fresh))
