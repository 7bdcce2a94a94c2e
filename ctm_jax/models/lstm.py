"""The LSTM baseline the paper compares the CTM with (the reference's
models/lstm.py, `LSTMBaseline`).

The same featurisation as the CTM (backbone, positional embedding, kv_proj,
the attention's key/value projections, once), then per tick: a query from the
last layer's hidden state -> multi-head attention over the tokens -> a stacked
LSTM step -> a linear read-out and its certainty. Parameter names follow the
reference's state_dict (ctm_jax/interop/torch.py): `lstm/weight_ih_l<k>` etc.
in torch's layout (gate rows i, f, g, o), per-tick modules under `tick/`.

Dimension glossary:
  B batch   T ticks   L LSTM layers   D hidden width (d_model)
  E d_input (attention width)   K heads   F head width   N tokens   O out_dims
"""

import math
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctm_jax.models import ctm
from ctm_jax.models import layers


class LSTMWeights(nn.Module):
  """torch.nn.LSTM's parameters, in its layout and with its init
  (U(-1/sqrt(D), 1/sqrt(D)) for every weight and bias)."""

  num_layers: int
  d_input: int
  d_model: int
  # torch.nn.LSTMCell's names: one layer, no `_l0` suffix.
  cell: bool = False

  @nn.compact
  def __call__(self):
    init = layers.uniform(1 / math.sqrt(self.d_model))
    out = []
    for layer in range(self.num_layers):
      width = self.d_input if layer == 0 else self.d_model
      suffix = '' if self.cell else f'_l{layer}'
      out.append({
          'w_ih': self.param(f'weight_ih{suffix}', init, (4 * self.d_model, width)),
          'w_hh': self.param(f'weight_hh{suffix}', init, (4 * self.d_model, self.d_model)),
          'b_ih': self.param(f'bias_ih{suffix}', init, (4 * self.d_model,)),
          'b_hh': self.param(f'bias_hh{suffix}', init, (4 * self.d_model,)),
      })
    return out


def lstm_step(weights, x_BxE, h_LxBxD, c_LxBxD, dropout, deterministic, dtype):
  """One step of a stacked LSTM (torch.nn.LSTM: gates i, f, g, o; dropout on
  every layer's output but the last, in training). Returns (h, c) (L, B, D)."""
  hs, cs = [], []
  inputs_BxW = x_BxE
  for layer, w in enumerate(weights):
    gates = (
        inputs_BxW.astype(dtype) @ w['w_ih'].T.astype(dtype)
        + h_LxBxD[layer].astype(dtype) @ w['w_hh'].T.astype(dtype)
    ).astype(jnp.float32) + w['b_ih'] + w['b_hh']
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c_LxBxD[layer] + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    hs.append(h)
    cs.append(c)
    inputs_BxW = h
    if layer < len(weights) - 1:
      inputs_BxW = nn.Dropout(dropout, deterministic=deterministic)(inputs_BxW)
  return jnp.stack(hs), jnp.stack(cs)


class LSTMTick(nn.Module):
  """One tick: query from the top hidden state, attention, LSTM step, read-out.

  Reads `ctm.TickInputs` as the CTM's tick does (keys/values or a per-tick key
  set; `attend` False feeds `features_BxE` instead; `active_B` False holds an
  example's state)."""

  d_input: int
  heads: int
  out_dims: int
  prediction_reshaper: tuple[int, ...]
  dropout: float
  train: bool = False
  track: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, state, per_tick: ctm.TickInputs, fixed: ctm.TickInputs, weights):
    inputs = per_tick.merge(fixed)
    h_LxBxD, c_LxBxD = state
    k_BxKxNxF, v_BxKxNxF = inputs.keys_values()
    q_BxE = layers.Linear(self.d_input, dtype=self.dtype, name='q_proj')(h_LxBxD[-1])
    features_BxE, attention_BxKxN = ctm.attend(self, q_BxE, k_BxKxNxF, v_BxKxNxF, inputs.key_mask_BxN)
    features_BxE = inputs.attended_or_direct(features_BxE)
    new_state = lstm_step(weights, features_BxE, h_LxBxD, c_LxBxD, self.dropout, not self.train, self.dtype)
    if inputs.active_B is not None:
      new_state = ctm.hold(inputs.active_B, new_state, (h_LxBxD, c_LxBxD), batch_axis=1)
    h_LxBxD, c_LxBxD = new_state
    prediction_BxO = layers.Linear(self.out_dims, dtype=self.dtype, name='output_projector_0')(
        h_LxBxD[-1]
    ).astype(jnp.float32)
    outputs = {
        'predictions': prediction_BxO,
        'certainties': ctm.certainty(prediction_BxO, self.prediction_reshaper),
    }
    if self.track:
      outputs['post_activations'] = h_LxBxD[-1]
      outputs['attention'] = attention_BxKxN[:, :, None, :]
    return (h_LxBxD, c_LxBxD), outputs


class LSTMBaseline(nn.Module):
  """The reference's LSTMBaseline: `__call__(x, train=False, track=False)` ->
  ctm.CTMOutput (predictions (B, O, T), certainties (B, 2, T), no synch; with
  `track`, the last layer's hidden state per tick as post-activations, zeros
  as pre-activations, and the attention weights), inputs as the CTM's."""

  iterations: int
  d_model: int
  d_input: int
  heads: int
  backbone_type: str
  num_layers: int
  positional_embedding_type: str
  out_dims: int
  prediction_reshaper: Sequence[int] = (-1,)
  dropout: float = 0.0
  dtype: Any = jnp.float32

  attends: ClassVar[bool] = True
  decay_clamp_in_graph: ClassVar[bool] = False
  # The Q&A-MNIST baseline's torch.nn.LSTMCell: one layer, (D,) start states.
  single_cell: ClassVar[bool] = False

  def __post_init__(self):
    object.__setattr__(self, 'prediction_reshaper', tuple(self.prediction_reshaper))
    for field in ('iterations', 'd_model', 'd_input', 'heads', 'num_layers', 'out_dims'):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'{field}={value!r}: must be a positive integer')
    if self.d_input % self.heads:
      raise ValueError(f'd_input={self.d_input}: must be divisible by heads={self.heads}')
    object.__setattr__(self, 'dtype', jnp.dtype(self.dtype))
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False, track: bool = False) -> ctm.CTMOutput:
    self.check_input(x)
    batch = jax.tree.leaves(x)[0].shape[0]
    per_tick, fixed = self.tick_inputs(x, train)
    cell = self.single_cell
    weights = LSTMWeights(self.num_layers, self.d_input, self.d_model, cell, name='lstm_cell' if cell else 'lstm')()
    bound = math.sqrt(1 / self.d_model)
    start_shape = (self.d_model,) if cell else (self.num_layers, self.d_model)
    h_LxD = self.param('start_hidden_state', layers.uniform(bound), start_shape).reshape(-1, self.d_model)
    c_LxD = self.param('start_cell_state', layers.uniform(bound), start_shape).reshape(-1, self.d_model)
    state = tuple(jnp.broadcast_to(s[:, None], (self.num_layers, batch, self.d_model)) for s in (h_LxD, c_LxD))
    scan = nn.scan(
        LSTMTick,
        variable_broadcast='params',
        split_rngs={'params': False, 'dropout': True},
        in_axes=(0, nn.broadcast, nn.broadcast),
        length=ctm.tick_count(per_tick, self.iterations),
    )
    tick = scan(
        d_input=self.d_input,
        heads=self.heads,
        out_dims=self.out_dims,
        prediction_reshaper=self.prediction_reshaper,
        dropout=self.dropout,
        train=train,
        track=track,
        dtype=self.dtype,
        name='tick',
    )
    _, per_tick_out = tick(state, per_tick, fixed, weights)
    tracking = None
    if track:
      tracking = self.tracking(per_tick_out, per_tick)
    return ctm.CTMOutput(
        predictions=jnp.transpose(per_tick_out['predictions'], (1, 2, 0)),
        certainties=jnp.transpose(per_tick_out['certainties'], (1, 2, 0)),
        synch_out=None,
        tracking=tracking,
    )

  def check_input(self, x) -> None:
    ctm.validate_input(self, x)

  def tick_inputs(self, x, train) -> tuple[ctm.TickInputs, ctm.TickInputs]:
    """(per-tick, fixed) TickInputs, as the CTM's: the featurised keys and values."""
    k_BxKxNxF, v_BxKxNxF = ctm.project_kv(self, ctm.featurise(self, x, train))
    return ctm.TickInputs(), ctm.TickInputs(keys_BxKxNxF=k_BxKxNxF, values_BxKxNxF=v_BxKxNxF)

  def tracking(self, per_tick_out, inputs: ctm.TickInputs) -> ctm.Tracking:
    """The reference's tracking: zeros as pre-activations."""
    del inputs
    post_TxBxD = per_tick_out['post_activations']
    return ctm.Tracking(
        pre_activations=jnp.zeros_like(post_TxBxD),
        post_activations=post_TxBxD,
        attention=per_tick_out['attention'],
        synch_out=None,
        synch_action=None,
    )
