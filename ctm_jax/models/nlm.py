"""Neuron-level models: a private MLP per neuron over its pre-activation history.

Dimensions: D neurons (d_model), B batch, M memory length (history),
I input width per neuron, O output width per neuron, H NLM hidden width,
N positions (ticks x batch) of a deferred weight gradient.

Activations are neuron-major, (D, B, ...): the D private matmuls are then one
batched matmul whose batch axis is already outermost, with no transposes of the
(large) trace around it in either pass.
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
    """(D, I, O) private matrices W / T, from this layer's params."""
    w_DxIxO = jnp.transpose(params['w1'], (2, 0, 1)) / params['temperature']
    return w_DxIxO.astype(dtype)

  @staticmethod
  def window_weight_gradient(history_DxBxM, newest_TxDxB, dy_TxDxBxO):
    """`weight_gradient` of T calls on sliding windows: the history before the
    first (D, B, M) and each call's new entry (T, D, B)."""
    t, d, b = newest_TxDxB.shape
    m = history_DxBxM.shape[-1]
    o = dy_TxDxBxO.shape[-1]
    history_DxKxB = jnp.concatenate(
        [
            jnp.swapaxes(history_DxBxM.astype(newest_TxDxB.dtype), 1, 2),
            jnp.transpose(newest_TxDxB, (1, 0, 2)),
        ],
        axis=1,
    )  # K = M + T entries, oldest first; call t sees entries t + 1 ... t + M.
    # Row i of neuron d's input matrix is a contiguous run of its history.
    x_DxIxN = jnp.stack(
        [history_DxKxB[:, 1 + i : 1 + i + t].reshape(d, t * b) for i in range(m)], axis=1
    )
    dy_DxNxO = jnp.swapaxes(dy_TxDxBxO, 0, 1).reshape(d, t * b, o)
    return jnp.einsum('din,dno->dio', x_DxIxN, dy_DxNxO, preferred_element_type=jnp.float32)

  @staticmethod
  def weight_gradient(x_DxBxI, dy_DxBxO):
    """(D, I, O) gradient of the effective weight from the recorded inputs and
    output cotangents (any leading positions: ticks), float32."""
    # (D, I, N) @ (D, N, O), N = ticks x batch: the batched matmul layout
    # XLA's CPU dots run fastest.
    d, b, i = x_DxBxI.shape[-3:]
    o = dy_DxBxO.shape[-1]
    x_DxIxN = jnp.transpose(x_DxBxI.reshape(-1, d, b, i), (1, 3, 0, 2)).reshape(d, i, -1)
    dy_DxNxO = jnp.swapaxes(dy_DxBxO.reshape(-1, d, b, o), 0, 1).reshape(d, -1, o)
    return jnp.einsum('din,dno->dio', x_DxIxN, dy_DxNxO, preferred_element_type=jnp.float32)

  @nn.compact
  def __call__(self, x_DxBxI, train: bool = False, glu: bool = False):
    newest_only = self.window and not self.do_norm and not (self.dropout > 0 and train)
    if self.dropout > 0:
      x_DxBxI = nn.Dropout(self.dropout, deterministic=not train)(x_DxBxI)
    if self.do_norm:
      x_DxBxI = layers.LayerNorm(name='layernorm', dtype=self.dtype)(x_DxBxI)
    bound = 1.0 / math.sqrt(self.in_dims + self.out_dims)
    w1_IxOxD = self.param(
        'w1', layers.uniform(bound), (self.in_dims, self.out_dims, self.n_neurons)
    )
    b1_1xDxO = self.param('b1', nn.initializers.zeros, (1, self.n_neurons, self.out_dims))
    temperature = self.param('temperature', nn.initializers.ones, (1,))
    # (xW + b) / T as x(W / T) + b / T: the division touches the small weights,
    # not the (D, B, O) output, in both passes.
    w_DxIxO = self.effective_weight({'w1': w1_IxOxD, 'temperature': temperature}, self.dtype)
    b_Dx1xO = (jnp.transpose(b1_1xDxO, (1, 0, 2)) / temperature).astype(self.dtype)
    x_DxBxI = x_DxBxI.astype(self.dtype)

    # d: neuron, b: batch, i: input, o: output. One private matrix per neuron.
    equation = 'dbi,dio->dbo'
    if self.defer:
      # One matmul (its recorded input and probe are the whole layer's).
      y_DxBxO = layers.deferred_matmul(self, equation, x_DxBxI, w_DxIxO, newest_only)
      y_DxBxO = y_DxBxO + b_Dx1xO
      if not glu:
        return y_DxBxO
      half = self.out_dims // 2
      return y_DxBxO[..., :half] * jax.nn.sigmoid(y_DxBxO[..., half:])

    def linear(columns):
      return jnp.einsum(equation, x_DxBxI, w_DxIxO[..., columns]) + b_Dx1xO[..., columns]

    if not glu:
      return linear(slice(None))
    half = self.out_dims // 2
    return linear(slice(None, half)) * jax.nn.sigmoid(linear(slice(half, None)))


def neuron_level_models(
    trace_DxBxM,
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
  """Post-activations z (D, B) from the neuron-major pre-activation trace (D, B, M).

  Call inside a compact method: layers are named after the reference's
  `trace_processor.0.{0,2}` so weights import one to one. `window`: the trace
  is the sliding history, one new entry per call (SuperLinear.window).
  """
  n_neurons, _, memory_length = trace_DxBxM.shape
  common = dict(n_neurons=n_neurons, do_norm=do_norm, dropout=dropout, dtype=dtype, defer=defer)
  h_DxBxI = trace_DxBxM
  if deep:
    h_DxBxI = SuperLinear(
        memory_length,
        2 * memory_hidden_dims,
        window=window,
        name='trace_processor_0_0',
        **common,
    )(h_DxBxI, train, glu=True)
    h_DxBx1 = SuperLinear(memory_hidden_dims, 2, name='trace_processor_0_2', **common)(
        h_DxBxI, train, glu=True
    )
  else:
    h_DxBx1 = SuperLinear(memory_length, 2, window=window, name='trace_processor_0_0', **common)(
        h_DxBxI, train, glu=True
    )
  # The last GLU maps the 2-wide output to one value per neuron.
  return h_DxBx1[..., 0]
