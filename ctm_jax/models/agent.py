"""The CTM as a recurrent agent: the reference's ContinuousThoughtMachineRL,
its LSTM baseline, and the actor-critic agent of its PPO script.

A recurrent model reads one observation and the state carried from the
previous environment step, runs `iterations` ticks and returns a
representation and the new state:

* the CTM carries the pre-activation trace and a window of its
  post-activations, both (B, D, M); its representation is the
  synchronisation of the last `n_synch_out` neurons over that window, each
  pair decaying by exp(-clamp(p, 0, 4)) per step back (clamped inside the
  graph). No attention, no output projector, no action synch.
* the LSTM carries (h, c), both (B, D); its representation is h.

`CTMAgent` / `LSTMAgent` reset the carried state of the environments whose episode
just ended, runs the recurrent model and reads action logits and a value with
two MLPs (64, 64, ReLU; orthogonal init, as the reference's `layer_init`).
Parameter names follow the reference's state_dict (ctm_jax/interop/torch.py):
the agent's `recurrent_model.*`, `actor.{0,2,4}`, `critic.{0,2,4}`.

Dimension glossary:
  B batch (environments)   D neurons (d_model)   M memory length
  E d_input   T ticks   P synch size   A actions   F observation features
  N synchronised neurons (n_synch_out)   X windows (any number)
  G grid side (the 7x7 egocentric view)
"""

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import sharding
from ctm_jax.models import ctm
from ctm_jax.models import layers
from ctm_jax.models import lstm
from ctm_jax.models import nlm
from ctm_jax.models import synapse

BACKBONES = ('classic-control-backbone', 'navigation-backbone')
# The navigation backbone's vocabularies (MiniGrid's object, colour and state
# ids) and embedding width, and the side of the egocentric view.
NUM_OBJECTS, NUM_COLOURS, NUM_STATES, EMBEDDING_DIM = 11, 6, 3, 8
GRID = 7
# The RL synch's decay clamp, applied in the graph.
DECAY_CLAMP = (0.0, 4.0)
HEAD_WIDTH = 64
# The reference's agent holds its recurrent model under this name.
AGENT_RECURRENT = 'recurrent_model'


def _glu_ln(h, width, dtype, linear_name, norm_name):
  """Linear(2 * width) -> GLU -> LayerNorm, the reference's repeated block."""
  h = layers.Linear(2 * width, dtype=dtype, name=linear_name)(h)
  return layers.LayerNorm(dtype=dtype, name=norm_name)(nn.glu(h, axis=-1))


class ClassicControlBackbone(nn.Module):
  """Flatten -> [Linear(2E), GLU, LayerNorm] x 2: (B, F) floats -> (B, E)."""

  d_input: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxF):
    h = x_BxF.reshape(x_BxF.shape[0], -1).astype(jnp.float32)
    h = _glu_ln(h, self.d_input, self.dtype, 'input_projector_1', 'input_projector_3')
    return _glu_ln(h, self.d_input, self.dtype, 'input_projector_4', 'input_projector_6')


class NavigationBackbone(nn.Module):
  """MiniGrid's (B, G, G, 3) object / colour / state ids -> (B, G, G, E):
  four embeddings (the position one per cell) concatenated in that order,
  then [Linear(2E), GLU, LayerNorm] x 2 per cell."""

  d_input: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxGxGx3):
    ids = x_BxGxGx3.astype(jnp.int32)
    batch, height, width, _ = ids.shape
    init = nn.initializers.normal(1.0)  # torch.nn.Embedding

    def embed(name, size, index):
      return nn.Embed(size, EMBEDDING_DIM, embedding_init=init, name=name)(index)

    position_GxG = jnp.arange(height * width).reshape(height, width)
    h = jnp.concatenate(
        [
            embed('object_embedding', NUM_OBJECTS, ids[..., 0]),
            embed('color_embedding', NUM_COLOURS, ids[..., 1]),
            embed('state_embedding', NUM_STATES, ids[..., 2]),
            jnp.broadcast_to(
                embed('position_embedding', height * width, position_GxG),
                (batch, height, width, EMBEDDING_DIM),
            ),
        ],
        -1,
    )
    h = _glu_ln(h, self.d_input, self.dtype, 'project_to_d_projection_0', 'project_to_d_projection_2')
    return _glu_ln(h, self.d_input, self.dtype, 'project_to_d_projection_3', 'project_to_d_projection_5')


def make_backbone(backbone_type: str, d_input: int, dtype):
  if backbone_type == 'classic-control-backbone':
    return ClassicControlBackbone(d_input, dtype)
  if backbone_type == 'navigation-backbone':
    return NavigationBackbone(d_input, dtype)
  raise ValueError(f'backbone_type={backbone_type!r}: expected one of {", ".join(map(repr, BACKBONES))}')


def _flat_features(model, x):
  """`model.backbone`'s features of observations x (B, ...), flattened: (B, I)."""
  _check_backbone_input(model.backbone_type, x)
  features = model.backbone(x)
  return features.reshape(features.shape[0], -1)


def _check_backbone_input(backbone_type, x):
  if backbone_type == 'navigation-backbone':
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'x.shape={tuple(x.shape)!r}: the navigation backbone takes (B, 7, 7, 3) object/colour/state ids')
  elif x.ndim < 2:
    raise ValueError(f'x.shape={tuple(x.shape)!r}: the classic-control backbone takes (B, F) observations')


class SynapseInput(nn.Module):
  """Linear(O) over [features (E), newest post-activation (D)], the first
  layer of the RL synapses, computed as features @ W[:E] + z @ W[E:] + b:
  the features' half is the same on every tick of an environment step (and
  a replay's are known before its scan), so `project` computes it once.

  Called with `features_BxE` it creates or reads its params (kernel (E + D,
  O), bias (O,), as layers.Linear's); with `projected_BxO` (`project`'s
  output) it adds the post-activations' half only."""

  features: int
  dtype: Any = jnp.float32

  @staticmethod
  def project(params, features_xE, dtype):
    """features @ W[:E] + b, any leading axes."""
    kernel_ExO = params['kernel'][: features_xE.shape[-1]]
    return jnp.dot(features_xE.astype(dtype), kernel_ExO.astype(dtype)) + params['bias'].astype(dtype)

  @nn.compact
  def __call__(self, z_BxD, features_BxE=None, projected_BxO=None):
    if projected_BxO is None:
      fan_in = features_BxE.shape[-1] + z_BxD.shape[-1]
      init = layers.uniform(1.0 / math.sqrt(fan_in))
      params = {
          'kernel': self.param('kernel', init, (fan_in, self.features), jnp.float32),
          'bias': self.param('bias', init, (self.features,), jnp.float32),
      }
      projected_BxO = self.project(params, features_BxE, self.dtype)
    kernel = self.get_variable('params', 'kernel')
    kernel_DxO = kernel[kernel.shape[0] - z_BxD.shape[-1] :]
    return projected_BxO + jnp.dot(z_BxD.astype(self.dtype), kernel_DxO.astype(self.dtype))


class RLTick(nn.Module):
  """One tick: synapses over [features, newest post-activation] -> trace
  shift -> NLMs: (trace (D, M, B), z (B, D)) -> the same after the tick (the
  caller keeps the post-activations' window).

  `inputs` holds 'projected' (the synapses' feature half,
  `SynapseInput.project`, computed once per environment step) or, where
  dropout acts on the features (training with dropout) and at init,
  'features' (B, I)."""

  d_model: int
  synapse_depth: int
  deep_nlms: bool
  memory_hidden_dims: int
  do_layernorm_nlm: bool
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry, inputs, train: bool = False, track: bool = False):
    trace_DxMxB, z_BxD = carry
    if self.synapse_depth == 1:
      # Two blocks where the main class has one (the reference's RL synapses).
      dropout = nn.Dropout(self.dropout, deterministic=not train)
      synapse_input = SynapseInput(2 * self.d_model, self.dtype, name='synapses_1')
      if 'projected' in inputs:
        h = synapse_input(dropout(z_BxD), projected_BxO=inputs['projected'])
      else:
        h = synapse_input(dropout(z_BxD), features_BxE=dropout(inputs['features']))
      h = layers.LayerNorm(dtype=self.dtype, name='synapses_3')(nn.glu(h, axis=-1))
      pre_BxD = _glu_ln(h, self.d_model, self.dtype, 'synapses_4', 'synapses_6')
    else:
      synapse_in = jnp.concatenate(
          [inputs['features'].astype(self.dtype), z_BxD.astype(self.dtype)], -1
      )
      pre_BxD = synapse.SynapseUNet(
          self.d_model, self.synapse_depth, self.dropout, dtype=self.dtype, name='synapses'
      )(synapse_in, train)
    pre_BxD = pre_BxD.astype(jnp.float32)
    trace_DxMxB = ctm.push(trace_DxMxB, pre_BxD.T, axis=1)
    z_DxB = nlm.neuron_level_models(
        trace_DxMxB,
        deep=self.deep_nlms,
        memory_hidden_dims=self.memory_hidden_dims,
        do_norm=self.do_layernorm_nlm,
        dropout=self.dropout,
        train=train,
        dtype=self.dtype,
    )
    z_BxD = z_DxB.T.astype(jnp.float32)
    out = {'pre_activations': pre_BxD, 'post_activations': z_BxD} if track else {}
    return (trace_DxMxB, z_BxD), out

  def inputs(self, params, features_xI, train: bool):
    """The tick's `inputs` for these features (any leading axes), read from
    the tick's `params`: their synapse projection, where it may be computed
    once (no dropout on them)."""
    if self.synapse_depth == 1 and not (train and self.dropout > 0):
      return {'projected': SynapseInput.project(params['synapses_1'], features_xI, self.dtype)}
    return {'features': features_xI}


def window_synch_pairs(n_synch: int):
  """(left_P, right_P): the upper triangle, diagonal included, row-major (torch's mask order)."""
  left, right = np.triu_indices(n_synch)
  return left.astype(np.int32), right.astype(np.int32)


def _pair_place(n_synch: int, symmetric: bool):
  """(N*N, P) 0/1: pair k at (i, j) of an N x N grid (and at (j, i) if symmetric)."""
  left_P, right_P = window_synch_pairs(n_synch)
  place_NNxP = np.zeros((n_synch * n_synch, len(left_P)), np.float32)
  place_NNxP[left_P * n_synch + right_P, np.arange(len(left_P))] = 1.0
  if symmetric:
    place_NNxP[right_P * n_synch + left_P, np.arange(len(left_P))] = 1.0
  return place_NNxP


def _decay_weights(decay_P, memory: int):
  """(age_M, weight_MxP): steps back from the newest, exp(-age * decay)."""
  age_M = jnp.arange(memory - 1, -1, -1, dtype=jnp.float32)
  return age_M, jnp.exp(-age_M[:, None] * decay_P[None, :])


def _pair_grid(weight_MxP, n_synch: int):
  """(M, N, N): each pair's weight at (i, j) and (j, i)."""
  return (weight_MxP @ _pair_place(n_synch, True).T).reshape(-1, n_synch, n_synch)


def _pair_sums(z_MxNxX, weight_MxNxN):
  """sum_m z[m, i] z[m, j] w[m, i, j], (N, N, X). Unrolled over the short
  memory axis so that XLA emits one element-wise loop with X innermost
  (vectorised), not a reduction over a materialised (X, N, N, M) product."""
  total_NxNxX = jnp.zeros((), z_MxNxX.dtype)
  for m in range(z_MxNxX.shape[0]):
    total_NxNxX = total_NxNxX + z_MxNxX[m, :, None, :] * z_MxNxX[m, None, :, :] * weight_MxNxN[m, :, :, None]
  return total_NxNxX


def _upper(x_NxNxX):
  """The pairs' rows (P, X), row-major upper triangle."""
  n = x_NxNxX.shape[0]
  left_P, right_P = window_synch_pairs(n)
  return x_NxNxX.reshape(n * n, -1)[left_P * n + right_P]


@jax.custom_vjp
def window_pair_sums(z_MxNxX, decay_P):
  """S[k, x] = sum_m d[m, k] z[m, i_k, x] z[m, j_k, x], d[m, k] = exp(-(M - 1 - m)
  decay_k): the unnormalised synchronisation of X windows, (P, X).

  Its gradient is written out (element-wise loops again) where autodiff
  would emit reductions over (X, N, N, M) products, which XLA:CPU
  materialises; the decay's uses sum_m age_m d[m, k] z z."""
  return _window_pair_sums_fwd(z_MxNxX, decay_P)[0]


def _window_pair_sums_fwd(z_MxNxX, decay_P):
  _, weight_MxP = _decay_weights(decay_P, z_MxNxX.shape[0])
  sums_PxX = _upper(_pair_sums(z_MxNxX, _pair_grid(weight_MxP, z_MxNxX.shape[1])))
  return sums_PxX, (z_MxNxX, decay_P)


def _window_pair_sums_bwd(residuals, g_PxX):
  z_MxNxX, decay_P = residuals
  memory, n, x = z_MxNxX.shape
  age_M, weight_MxP = _decay_weights(decay_P, memory)
  weight_MxNxN = _pair_grid(weight_MxP, n)
  g_NxNxX = (_pair_place(n, False) @ g_PxX).reshape(n, n, x)
  # Both factors of each product: dz[m, i] = sum_j (g[i, j] + g[j, i]) w[m, i, j] z[m, j].
  both_NxNxX = g_NxNxX + jnp.swapaxes(g_NxNxX, 0, 1)
  dz_MxNxX = jnp.zeros((), z_MxNxX.dtype)
  for j in range(n):
    dz_MxNxX = dz_MxNxX + both_NxNxX[None, :, j, :] * weight_MxNxN[:, :, j, None] * z_MxNxX[:, j, None, :]
  aged_PxX = _upper(_pair_sums(z_MxNxX, _pair_grid(age_M[:, None] * weight_MxP, n)))
  return dz_MxNxX, -jnp.sum(g_PxX * aged_PxX, axis=1)


window_pair_sums.defvjp(_window_pair_sums_fwd, _window_pair_sums_bwd)


def window_synchronisation(z_MxNxX, decay_P):
  """S[x, k] = sum_t d[t,k] z_t,i z_t,j / sqrt(sum_t d[t,k]) for X windows of
  the synchronised neurons (M, N, X): (X, P)."""
  _, weight_MxP = _decay_weights(decay_P, z_MxNxX.shape[0])
  return window_pair_sums(z_MxNxX, decay_P).T / jnp.sqrt(weight_MxP.sum(0))


class ContinuousThoughtMachineRL(nn.Module):
  """The reference's ContinuousThoughtMachineRL, constructor for constructor.

  `__call__(x, carry, train=False, track=False)` -> (synch (B, P), new carry,
  tracking or None); `initial_carry(batch)` -> the learned start traces,
  repeated. `neuron_select_type` must be 'first-last' (the reference's RL
  synch reads the last n neurons whatever it says; 'random' would fail there).
  """

  iterations: int
  d_model: int
  d_input: int
  n_synch_out: int
  synapse_depth: int
  memory_length: int
  deep_nlms: bool
  memory_hidden_dims: int
  do_layernorm_nlm: bool
  backbone_type: str
  prediction_reshaper: Sequence[int] = (-1,)
  dropout: float = 0.0
  neuron_select_type: str = 'first-last'
  dtype: Any = jnp.float32

  decay_clamp_in_graph: ClassVar[bool] = True

  def __post_init__(self):
    object.__setattr__(self, 'prediction_reshaper', tuple(self.prediction_reshaper))
    _check_positive(self, ('iterations', 'd_model', 'd_input', 'n_synch_out', 'synapse_depth', 'memory_length'))
    if self.deep_nlms:
      _check_positive(self, ('memory_hidden_dims',))
    if self.backbone_type not in BACKBONES:
      raise ValueError(f'backbone_type={self.backbone_type!r}: expected one of {", ".join(map(repr, BACKBONES))}')
    if self.neuron_select_type != 'first-last':
      raise ValueError(f"neuron_select_type={self.neuron_select_type!r}: the RL CTM synchronises the last n_synch_out neurons ('first-last')")
    if self.n_synch_out > self.d_model:
      raise ValueError(f'n_synch_out={self.n_synch_out}: must be <= d_model={self.d_model}')
    if not 0 <= self.dropout < 1:
      raise ValueError(f'dropout={self.dropout}: must lie in [0, 1)')
    if jnp.dtype(self.dtype) not in ctm.COMPUTE_DTYPES:
      raise ValueError(f'dtype={self.dtype!r}: expected float32 or bfloat16')
    object.__setattr__(self, 'dtype', jnp.dtype(self.dtype))
    super().__post_init__()

  @property
  def synch_size_out(self) -> int:
    return self.n_synch_out * (self.n_synch_out + 1) // 2

  @property
  def hidden_size(self) -> int:
    """Width of the representation the actor and critic read."""
    return self.synch_size_out

  def setup(self):
    d, m = self.d_model, self.memory_length
    bound = math.sqrt(1 / (d + m))
    self.start_trace = self.param(
        'start_trace', sharding.with_axes(layers.uniform(bound), ('neurons', None)), (d, m)
    )
    self.start_activated_trace = self.param('start_activated_trace', layers.uniform(bound), (d, m))
    self.decay_params_out = self.param('decay_params_out', nn.initializers.zeros, (self.synch_size_out,))
    self.backbone = make_backbone(self.backbone_type, self.d_input, self.dtype)
    self.tick = RLTick(**self._tick_kwargs())

  def _tick_kwargs(self):
    return dict(
        d_model=self.d_model,
        synapse_depth=self.synapse_depth,
        deep_nlms=self.deep_nlms,
        memory_hidden_dims=self.memory_hidden_dims,
        do_layernorm_nlm=self.do_layernorm_nlm,
        dropout=self.dropout,
        dtype=self.dtype,
    )

  def initial_carry(self, batch: int):
    """(state_trace, activated_state_trace), each (B, D, M)."""
    return tuple(
        jnp.broadcast_to(s, (batch, *s.shape)) for s in (self.start_trace, self.start_activated_trace)
    )

  def zero_carry(self, batch: int):
    return tuple(jnp.zeros((batch, self.d_model, self.memory_length)) for _ in range(2))

  def features(self, x):
    return _flat_features(self, x)

  def _tick_runner(self, features_xI, train: bool, track: bool):
    """(run, inputs): `run(state, inputs, rng, push)` runs `iterations` ticks
    from state (trace (D, M, B), z (B, D), window), `push(window, z)` adding
    each tick's post-activations to the window, a pure function of the
    tick's params read here; `inputs` are the ticks' for these features
    (any leading axes: a replay's steps project the synapses' feature half
    for all of them at once)."""
    params = self.variables['params']
    inputs = self.tick.inputs(params['tick'], features_xI, train)
    # The NLMs' weights in their matmuls' layouts once, outside the loops.
    hoisted = nlm.hoist(params['tick'], self.dtype)
    tick = RLTick(**self._tick_kwargs(), parent=None)

    def run(state, inputs, rng, push):
      def body(state, i):
        trace_DxMxB, z_BxD, window = state
        rngs = {'dropout': jax.random.fold_in(rng, i)} if rng is not None else {}
        (trace_DxMxB, z_BxD), out = tick.apply(
            {'params': hoisted}, (trace_DxMxB, z_BxD), inputs, train, track, rngs=rngs
        )
        return (trace_DxMxB, z_BxD, push(window, z_BxD)), out

      return jax.lax.scan(body, state, jnp.arange(self.iterations), unroll=True)

    return run, inputs

  def _dropout_rng(self, train: bool):
    return self.make_rng('dropout') if train and self.dropout > 0 else None

  def __call__(self, x, carry, train: bool = False, track: bool = False):
    features_BxI = self.features(x)
    trace_BxDxM, z_trace_BxDxM = carry
    trace_DxMxB = jnp.transpose(trace_BxDxM, (1, 2, 0))
    if self.is_initializing():  # creates the tick's params under 'tick'
      outs = []
      for _ in range(self.iterations):
        (trace_DxMxB, z_BxD), out = self.tick(
            (trace_DxMxB, z_trace_BxDxM[:, :, -1]), {'features': features_BxI}, train, track
        )
        z_trace_BxDxM = ctm.push(z_trace_BxDxM, z_BxD)
        outs.append(out)
      per_tick = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    else:
      run, inputs = self._tick_runner(features_BxI, train, track)
      state = (trace_DxMxB, z_trace_BxDxM[:, :, -1], z_trace_BxDxM)
      (trace_DxMxB, _, z_trace_BxDxM), per_tick = run(state, inputs, self._dropout_rng(train), ctm.push)
    synch_BxP = self.synchronisation(z_trace_BxDxM)
    new_carry = (jnp.transpose(trace_DxMxB, (2, 0, 1)), z_trace_BxDxM)
    tracking = dict(per_tick, synch=synch_BxP) if track else None
    return synch_BxP, new_carry, tracking

  def synchronisation(self, z_trace_xDxM):
    """The representation (..., P) from post-activation windows (..., D, M)
    (D >= n_synch_out: the last n_synch_out neurons are read)."""
    lead = z_trace_xDxM.shape[:-2]
    z_trace_XxDxM = z_trace_xDxM.reshape(-1, *z_trace_xDxM.shape[-2:])
    synch_XxP = self._window_synchronisation(jnp.transpose(z_trace_XxDxM[:, -self.n_synch_out :], (2, 1, 0)))
    return synch_XxP.reshape(*lead, -1)

  def _window_synchronisation(self, z_MxNxX):
    return window_synchronisation(z_MxNxX, ctm.clamp_in_graph(self.decay_params_out, DECAY_CLAMP))

  def replay(self, features_TxBxI, carry, done_TxB, carries_state: bool, train: bool = False):
    """`__call__` over T environment steps of B environments from `carry`,
    given their features, the carry reset to the start traces before step t
    where `done_TxB[t]` (every step without `carries_state`). Returns the
    synch (T, B, P).

    The same computation as T calls, arranged for a training replay: the
    synapses' feature half for all T x B at once before the scan, which
    carries the trace in the ticks' layout, the newest post-activations and
    the window of the last n_synch_out neurons only, and the
    synchronisation of all steps after it."""
    n = self.n_synch_out
    batch = done_TxB.shape[1]

    def state_of(trace_BxDxM, z_trace_BxDxM):
      # window (M, B, N): each tick's push copies one contiguous block.
      window_MxBxN = jnp.transpose(z_trace_BxDxM[:, -n:], (2, 0, 1))
      return (jnp.transpose(trace_BxDxM, (1, 2, 0)), z_trace_BxDxM[:, :, -1], window_MxBxN)

    start = state_of(*self.initial_carry(batch))
    run, inputs_TxB = self._tick_runner(features_TxBxI, train, False)
    rng = self._dropout_rng(train)

    def push(window_MxBxN, z_BxD):
      return ctm.push(window_MxBxN, z_BxD[:, -n:], axis=0)

    def step(state, xs):
      inputs, done_B, t = xs
      if carries_state:
        state = tuple(ctm.hold(done_B, s, c, axis) for s, c, axis in zip(start, state, (2, 0, 1)))
      else:
        state = start
      state, _ = run(state, inputs, None if rng is None else jax.random.fold_in(rng, t), push)
      return state, state[2]

    steps = jnp.arange(done_TxB.shape[0])
    _, window_TxMxBxN = jax.lax.scan(step, state_of(*carry), (inputs_TxB, done_TxB, steps))
    n_steps, memory = window_TxMxBxN.shape[:2]
    window_MxNxX = jnp.transpose(window_TxMxBxN, (1, 3, 0, 2)).reshape(memory, n, n_steps * batch)
    return self._window_synchronisation(window_MxNxX).reshape(n_steps, batch, -1)

  def reference_constants(self) -> dict[str, np.ndarray]:
    """The reference's buffers, fixed by the constructor (its forward ignores
    the index buffers): checked and dropped on import, written on export."""
    n = self.n_synch_out
    return {
        'out_neuron_indices_left': np.arange(n, dtype=np.int64),
        'out_neuron_indices_right': np.arange(n, dtype=np.int64),
        'diagonal_mask_out': np.triu(np.ones((n, n), dtype=bool)),
    }

  @classmethod
  def example_input(cls, state_dict, model_kwargs):
    """(observation, carry) of a batch of one, for the importer's init."""
    model = cls(**model_kwargs)
    return example_observation(model.backbone_type, observation_features(state_dict)), model.zero_carry(1)


class LSTMRL(nn.Module):
  """The reference's RL LSTM baseline (models/lstm_rl.py): one LSTMCell fed
  the same backbone features every tick. `__call__(x, carry)` -> (h, (h, c),
  tracking or None); `initial_carry(batch)` -> the learned start states."""

  iterations: int
  d_model: int
  d_input: int
  backbone_type: str
  dtype: Any = jnp.float32

  def __post_init__(self):
    _check_positive(self, ('iterations', 'd_model', 'd_input'))
    if self.backbone_type not in BACKBONES:
      raise ValueError(f'backbone_type={self.backbone_type!r}: expected one of {", ".join(map(repr, BACKBONES))}')
    object.__setattr__(self, 'dtype', jnp.dtype(self.dtype))
    super().__post_init__()

  @property
  def hidden_size(self) -> int:
    return self.d_model

  def setup(self):
    init = layers.uniform(math.sqrt(1 / self.d_model))
    self.start_hidden_state = self.param('start_hidden_state', init, (self.d_model,))
    self.start_cell_state = self.param('start_cell_state', init, (self.d_model,))
    self.backbone = make_backbone(self.backbone_type, self.d_input, self.dtype)
    cells = GRID * GRID if self.backbone_type == 'navigation-backbone' else 1
    self.lstm_cell = lstm.LSTMWeights(1, cells * self.d_input, self.d_model, cell=True)

  def initial_carry(self, batch: int):
    """(h, c), each (B, D)."""
    return tuple(
        jnp.broadcast_to(s, (batch, self.d_model)) for s in (self.start_hidden_state, self.start_cell_state)
    )

  def zero_carry(self, batch: int):
    return tuple(jnp.zeros((batch, self.d_model)) for _ in range(2))

  def features(self, x):
    return _flat_features(self, x)

  def _ticks(self, weights, features_BxI, hc):
    def tick(hc, _):
      h_1xBxD, c_1xBxD = lstm.lstm_step(
          weights, features_BxI, hc[0][None], hc[1][None], 0.0, True, self.dtype
      )
      return (h_1xBxD[0], c_1xBxD[0]), h_1xBxD[0]

    return jax.lax.scan(tick, tuple(hc), length=self.iterations)

  def __call__(self, x, carry, train: bool = False, track: bool = False):
    del train
    features_BxI = self.features(x)
    (h_BxD, c_BxD), h_TxBxD = self._ticks(self.lstm_cell(), features_BxI, carry)
    tracking = {'pre_activations': h_TxBxD, 'post_activations': h_TxBxD, 'synch': h_BxD} if track else None
    return h_BxD, (h_BxD, c_BxD), tracking

  def replay(self, features_TxBxI, carry, done_TxB, carries_state: bool, train: bool = False):
    """`__call__` over T environment steps from `carry`, given their
    features, (h, c) reset to the start states before step t where
    `done_TxB[t]`. Returns h (T, B, D)."""
    del carries_state, train  # the LSTM's state is always carried; no dropout
    weights = self.lstm_cell()
    start = self.initial_carry(done_TxB.shape[1])

    def step(hc, xs):
      features_BxI, done_B = xs
      hc, _ = self._ticks(weights, features_BxI, ctm.hold(done_B, start, tuple(hc), 0))
      return hc, hc[0]

    _, h_TxBxD = jax.lax.scan(step, tuple(carry), (features_TxBxI, done_TxB))
    return h_TxBxD

  @classmethod
  def example_input(cls, state_dict, model_kwargs):
    """(observation, carry) of a batch of one, for the importer's init."""
    model = cls(**model_kwargs)
    return example_observation(model.backbone_type, observation_features(state_dict)), model.zero_carry(1)


def _check_positive(model, fields):
  for field in fields:
    value = getattr(model, field)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f'{field}={value!r}: must be a positive integer')


def example_observation(backbone_type: str, features: int = 4):
  """A batch-of-one observation for init: a (1, 7, 7, 3) grid of ids, or (1, F) floats."""
  if backbone_type == 'navigation-backbone':
    return jnp.zeros((1, GRID, GRID, 3), jnp.int32)
  return jnp.zeros((1, features), jnp.float32)


def observation_features(state_dict) -> int:
  """F of a classic-control state_dict's (B, F) observations (its first layer's
  input width); 4 for any other."""
  for key, value in state_dict.items():
    if key.endswith('backbone.input_projector.1.weight'):
      return int(np.shape(value)[1])
  return 4


def _head(out: int):
  """The reference's layer_init: orthogonal weights (gain 1), zero biases."""
  return layers.Linear(out, kernel_init=nn.initializers.orthogonal(1.0), bias_init=nn.initializers.zeros)


def _recurrent_kwargs(agent, recurrent_cls) -> dict:
  names = [f.name for f in dataclasses.fields(recurrent_cls) if f.init and f.name not in ('parent', 'name')]
  return {name: getattr(agent, name) for name in names}


class AgentMixin:
  """The reference's PPO `Agent`: its recurrent model (`recurrent_model`, built
  from the agent's own constructor options), then actor and critic MLPs.

  `__call__(obs, carry, done)` resets the carry of examples whose `done` is
  set (the episode before this observation ended; with
  `continuous_state_trace=False` the CTM restarts every step) and returns
  (logits (B, A), value (B,), new carry, tracking or None).
  """

  recurrent_class: ClassVar[type]

  def setup(self):
    self.recurrent_model = self.recurrent_class(**_recurrent_kwargs(self, self.recurrent_class))
    self.actor_0, self.actor_2, self.actor_4 = _head(HEAD_WIDTH), _head(HEAD_WIDTH), _head(self.num_actions)
    self.critic_0, self.critic_2, self.critic_4 = _head(HEAD_WIDTH), _head(HEAD_WIDTH), _head(1)

  def initial_carry(self, batch: int):
    return self.recurrent_model.initial_carry(batch)

  def reset(self, carry, done_B):
    start = self.recurrent_model.initial_carry(done_B.shape[0])
    if not self.carries_state:
      return start
    return ctm.hold(done_B, start, carry, 0)

  def __call__(self, obs, carry, done_B, train: bool = False, track: bool = False):
    carry = self.reset(carry, done_B)
    hidden_BxH, carry, tracking = self.recurrent_model(obs, carry, train=train, track=track)
    logits_BxA, value_B = self.heads(hidden_BxH)
    return logits_BxA, value_B, carry, tracking

  def heads(self, hidden_xH):
    """(logits (..., A), value (...)) from the recurrent model's representation."""
    hidden_xH = hidden_xH.astype(jnp.float32)
    logits_xA = self.actor_4(nn.relu(self.actor_2(nn.relu(self.actor_0(hidden_xH)))))
    value_x = self.critic_4(nn.relu(self.critic_2(nn.relu(self.critic_0(hidden_xH)))))[..., 0]
    return logits_xA, value_x

  def replay(self, obs_TxB, carry, done_TxB, train: bool = False):
    """`__call__` over a rollout of T steps of B environments from its
    starting carry, as a training replay computes it: the backbone and the
    heads over all T x B at once, the recurrent model's steps in one scan
    (its `replay`). Returns (logits (T, B, A), value (T, B))."""
    steps, batch = done_TxB.shape
    features_NxI = self.recurrent_model.features(obs_TxB.reshape(steps * batch, *obs_TxB.shape[2:]))
    hidden_TxBxH = self.recurrent_model.replay(
        features_NxI.reshape(steps, batch, -1), carry, done_TxB, self.carries_state, train
    )
    return self.heads(hidden_TxBxH)

  def example_inputs(self, observation_shape, observation_dtype):
    """(obs, carry, done) of a batch of one, for init."""
    obs = jnp.zeros((1, *observation_shape), observation_dtype)
    return obs, self.zero_carry(1), jnp.ones((1,), bool)

  @classmethod
  def example_input(cls, state_dict, model_kwargs):
    """(obs, carry, done) of a batch of one, for the importer's init."""
    model = cls(**model_kwargs)
    obs = example_observation(model.backbone_type, observation_features(state_dict))
    return obs, model.zero_carry(1), jnp.ones((1,), bool)

  def reference_constants(self) -> dict[str, np.ndarray]:
    recurrent = self.recurrent_class(**_recurrent_kwargs(self, self.recurrent_class))
    constants = recurrent.reference_constants() if hasattr(recurrent, 'reference_constants') else {}
    return {f'{AGENT_RECURRENT}.{k}': v for k, v in constants.items()}


class CTMAgent(AgentMixin, ContinuousThoughtMachineRL):
  """The agent over a ContinuousThoughtMachineRL: its options, plus the
  environment's `num_actions` and `continuous_state_trace` (the reference's
  flag: carry the traces across environment steps, default on)."""

  num_actions: int = 2
  continuous_state_trace: bool = True

  recurrent_class = ContinuousThoughtMachineRL

  @property
  def carries_state(self) -> bool:
    return self.continuous_state_trace


class LSTMAgent(AgentMixin, LSTMRL):
  """The agent over the LSTM baseline (whose state is always carried)."""

  num_actions: int = 2
  continuous_state_trace: bool = True  # the reference ignores it for the LSTM

  recurrent_class = LSTMRL

  @property
  def carries_state(self) -> bool:
    return True
