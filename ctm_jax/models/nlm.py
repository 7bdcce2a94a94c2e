"""Neuron-level models: a private MLP per neuron over its pre-activation history.

Dimensions: D neurons (d_model), B batch, M memory length (history),
I input width per neuron, O output width per neuron, H NLM hidden width,
N positions (ticks x batch) of a deferred weight gradient.

Activations are neuron-major with the batch minor, (D, M, B) and (D, H, B):
the D private matmuls are one batched (O, I) @ (I, B) matmul with no transposes
of the (large) trace in either pass, and the weight gradient contracts
contiguous rows (faster than the (D, B, M) layout on XLA:CPU; a batch-minor
layout also fills accelerator lanes where M = 25 would not).
"""

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctm_jax.models import layers


class SuperLinear(nn.Module):
  """D independent linear maps, one per neuron, applied as one batched einsum.

  Parameters keep the reference's layout: w1 (I, O, D), b1 (1, D, O) and a
  learned scalar `temperature` that divides the output. With `glu=True` the
  call returns GLU(y) = y[..., :O/2] * sigmoid(y[..., O/2:]), computed as two
  half-width einsums so that neither pass splits or concatenates activations.
  """

  in_dims: int
  out_dims: int
  n_neurons: int
  do_norm: bool = False
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  defer: bool = False
  # The input is the sliding pre-activation history (one new entry per tick):
  # with `defer`, only the new entry is recorded where the matmul sees the
  # history itself (no dropout in training, no LayerNorm).
  window: bool = False

  # As layers.Linear's: what `defer` takes out of autodiff, what it reaches.
  DEFERRED_WEIGHT: ClassVar[str] = 'w1'
  WEIGHT_PARAMS: ClassVar[tuple[str, ...]] = ('w1', 'temperature')

  @staticmethod
  def effective_weight(params, dtype):
    """(D, O, I) private matrices (W / T)^T, from this layer's params."""
    w_DxOxI = jnp.transpose(params['w1'], (2, 1, 0)) / params['temperature']
    return w_DxOxI.astype(dtype)

  @staticmethod
  def window_weight_gradient(history_DxMxB, newest_TxDxB, dy_TxDxOxB):
    """`weight_gradient` of T calls on sliding windows: the history before the
    first (D, M, B) and each call's new entry (T, D, B)."""
    t, d, b = newest_TxDxB.shape
    m = history_DxMxB.shape[1]
    history_DxKxB = jnp.concatenate(
        [history_DxMxB.astype(newest_TxDxB.dtype), jnp.transpose(newest_TxDxB, (1, 0, 2))],
        axis=1,
    )  # K = M + T entries, oldest first; call t sees entries t + 1 ... t + M.
    # Row i of neuron d's input matrix is a contiguous run of its history.
    x_DxIxN = jnp.stack(
        [history_DxKxB[:, 1 + i : 1 + i + t].reshape(d, t * b) for i in range(m)], axis=1
    )
    return _contract_positions(x_DxIxN, _positions_last(dy_TxDxOxB))

  @staticmethod
  def weight_gradient(x_DxIxB, dy_DxOxB):
    """(D, O, I) gradient of the effective weight from the recorded inputs and
    output cotangents (any leading positions: ticks), float32."""
    return _contract_positions(_positions_last(x_DxIxB), _positions_last(dy_DxOxB))

  @nn.compact
  def __call__(self, x_DxIxB, train: bool = False, glu: bool = False):
    newest_only = self.window and not self.do_norm and not (self.dropout > 0 and train)
    if self.dropout > 0:
      x_DxIxB = nn.Dropout(self.dropout, deterministic=not train)(x_DxIxB)
    if self.do_norm:
      x_DxIxB = layers.LayerNorm(
          reduction_axes=1, feature_axes=1, name='layernorm', dtype=self.dtype
      )(x_DxIxB)
    bound = 1.0 / math.sqrt(self.in_dims + self.out_dims)
    w1_IxOxD = self.param(
        'w1', layers.uniform(bound), (self.in_dims, self.out_dims, self.n_neurons)
    )
    b1_1xDxO = self.param('b1', nn.initializers.zeros, (1, self.n_neurons, self.out_dims))
    temperature = self.param('temperature', nn.initializers.ones, (1,))
    # (xW + b) / T as x(W / T) + b / T: the division touches the small weights,
    # not the (D, O, B) output, in both passes.
    w_DxOxI = self.effective_weight({'w1': w1_IxOxD, 'temperature': temperature}, self.dtype)
    b_DxOx1 = (jnp.transpose(b1_1xDxO, (1, 2, 0)) / temperature).astype(self.dtype)
    x_DxIxB = x_DxIxB.astype(self.dtype)

    # d: neuron, b: batch, i: input, o: output. One private matrix per neuron.
    equation = 'dib,doi->dob'
    if self.defer:
      # One matmul (its recorded input and probe are the whole layer's).
      y_DxOxB = layers.deferred_matmul(self, equation, x_DxIxB, w_DxOxI, newest_only)
      y_DxOxB = y_DxOxB + b_DxOx1
      if not glu:
        return y_DxOxB
      half = self.out_dims // 2
      return y_DxOxB[:, :half] * jax.nn.sigmoid(y_DxOxB[:, half:])

    def linear(rows):
      return jnp.einsum(equation, x_DxIxB, w_DxOxI[:, rows]) + b_DxOx1[:, rows]

    if not glu:
      return linear(slice(None))
    half = self.out_dims // 2
    return linear(slice(None, half)) * jax.nn.sigmoid(linear(slice(half, None)))


def _positions_last(a_xDxRxB):
  """(..., D, R, B) -> (D, R, N): the leading positions (ticks) and the batch as N."""
  d, r, b = a_xDxRxB.shape[-3:]
  a_TxDxRxB = a_xDxRxB.reshape(-1, d, r, b)
  return jnp.transpose(a_TxDxRxB, (1, 2, 0, 3)).reshape(d, r, -1)


def _contract_positions(x_DxIxN, dy_DxOxN):
  """(D, O, I) = dy x^T per neuron, float32: both operands contract their rows."""
  return jnp.einsum('don,din->doi', dy_DxOxN, x_DxIxN, preferred_element_type=jnp.float32)


def neuron_level_models(
    trace_DxMxB,
    *,
    deep: bool,
    memory_hidden_dims: int,
    do_norm: bool,
    dropout: float,
    train: bool,
    dtype,
    defer: bool = False,
    window: bool = False,
):
  """Post-activations z (D, B) from the neuron-major pre-activation trace (D, M, B).

  Call inside a compact method: layers are named after the reference's
  `trace_processor.0.{0,2}` so weights import one to one. `window`: the trace
  is the sliding history, one new entry per call (SuperLinear.window).
  """
  n_neurons, memory_length, _ = trace_DxMxB.shape
  common = dict(n_neurons=n_neurons, do_norm=do_norm, dropout=dropout, dtype=dtype, defer=defer)
  h_DxIxB = trace_DxMxB
  if deep:
    h_DxIxB = SuperLinear(
        memory_length,
        2 * memory_hidden_dims,
        window=window,
        name='trace_processor_0_0',
        **common,
    )(h_DxIxB, train, glu=True)
    h_Dx1xB = SuperLinear(memory_hidden_dims, 2, name='trace_processor_0_2', **common)(
        h_DxIxB, train, glu=True
    )
  else:
    h_Dx1xB = SuperLinear(memory_length, 2, window=window, name='trace_processor_0_0', **common)(
        h_DxIxB, train, glu=True
    )
  # The last GLU maps the 2-wide output to one value per neuron.
  return h_Dx1xB[:, 0]
