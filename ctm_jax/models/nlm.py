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

from ctm_jax import sharding
from ctm_jax.models import layers


class SuperLinear(nn.Module):
  """D independent linear maps, one per neuron, applied as one batched einsum.

  Parameters keep the reference's layout: w1 (I, O, D), b1 (1, D, O) and a
  learned scalar `temperature` that divides the output. With `glu=True` the
  call returns GLU(y) = y[:, :O/2] * sigmoid(y[:, O/2:]) of the (D, O, B)
  output. The matmul is `private_matmul`, on weights `hoisted` from the params
  (in a tick scan, once: `hoist`).
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

  @staticmethod
  def hoisted(params, dtype):
    """What the matmul multiplies by, from this layer's params (names after
    HOISTED): (W / T) as (D, I, O), whose gradient the backward produces in
    that layout, its (D, O, I) transpose for the forward (a constant), and
    b / T as (D, O, 1). `hoist` computes these once, outside a tick scan."""
    temperature = params['temperature']
    w_DxIxO = (jnp.transpose(params['w1'], (2, 0, 1)) / temperature).astype(dtype)
    return {
        HOISTED + 'w_DxIxO': w_DxIxO,
        HOISTED + 'w_DxOxI': jax.lax.stop_gradient(jnp.swapaxes(w_DxIxO, 1, 2)),
        HOISTED + 'b_DxOx1': (jnp.transpose(params['b1'], (1, 2, 0)) / temperature).astype(dtype),
    }

  @nn.compact
  def __call__(self, x_DxIxB, train: bool = False, glu: bool = False):
    newest_only = self.window and not self.do_norm and not (self.dropout > 0 and train)
    if self.dropout > 0:
      x_DxIxB = nn.Dropout(self.dropout, deterministic=not train)(x_DxIxB)
    if self.do_norm:
      x_DxIxB = layers.LayerNorm(
          reduction_axes=1, feature_axes=1, name='layernorm', dtype=self.dtype
      )(x_DxIxB)
    x_DxIxB = x_DxIxB.astype(self.dtype)
    if self.has_variable('params', HOISTED + 'w_DxIxO'):  # applied with `hoist`ed params
      hoisted = {name: self.get_variable('params', name) for name in HOISTED_NAMES}
    else:
      bound = 1.0 / math.sqrt(self.in_dims + self.out_dims)
      params = {
          'w1': self.param(
              'w1', sharding.with_axes(layers.uniform(bound), (None, None, 'neurons')),
              (self.in_dims, self.out_dims, self.n_neurons),
          ),
          'b1': self.param(
              'b1', sharding.with_axes(nn.initializers.zeros, (None, 'neurons', None)),
              (1, self.n_neurons, self.out_dims),
          ),
          'temperature': self.param('temperature', nn.initializers.ones, (1,)),
      }
      hoisted = self.hoisted(params, self.dtype)
      if self.defer:
        w_DxOxI = self.effective_weight(params, self.dtype)
        y_DxOxB = layers.deferred_matmul(self, 'dib,doi->dob', x_DxIxB, w_DxOxI, newest_only)
        y_DxOxB = y_DxOxB + hoisted[HOISTED + 'b_DxOx1']
        return _glu(y_DxOxB) if glu else y_DxOxB
    # (xW + b) / T as x(W / T) + b / T: the division touches the small weights,
    # not the (D, O, B) output, in both passes.
    y_DxOxB = private_matmul(
        hoisted[HOISTED + 'w_DxIxO'], x_DxIxB, hoisted[HOISTED + 'w_DxOxI']
    )
    y_DxOxB = y_DxOxB + hoisted[HOISTED + 'b_DxOx1']
    return _glu(y_DxOxB) if glu else y_DxOxB


# SuperLinear.hoisted's names: the prefix marks them apart from params.
HOISTED = 'hoisted_'
HOISTED_NAMES = tuple(HOISTED + n for n in ('w_DxIxO', 'w_DxOxI', 'b_DxOx1'))
_PARAM_NAMES = frozenset({'w1', 'b1', 'temperature'})


def hoist(params, dtype):
  """`params` (a module tree's) with every SuperLinear's w1, b1 and temperature
  replaced by its `hoisted` forms. Apply a scanned module with these and each
  NLM weight is transposed and scaled once, outside the tick loop, and its
  gradient is summed over ticks in the layout the backward matmul produces
  (with the params, it would be transposed into theirs every tick); the
  gradient reaches the params through this function."""
  if not hasattr(params, 'items'):
    return params
  if _PARAM_NAMES <= set(params):
    rest = {k: v for k, v in params.items() if k not in _PARAM_NAMES}
    return {**rest, **SuperLinear.hoisted(params, dtype)}
  return {k: hoist(v, dtype) for k, v in params.items()}


def _glu(y_DxOxB):
  """GLU over the output axis: y[:, :O/2] * sigmoid(y[:, O/2:])."""
  half = y_DxOxB.shape[1] // 2
  return y_DxOxB[:, :half] * jax.nn.sigmoid(y_DxOxB[:, half:])


@jax.custom_vjp
def private_matmul(w_DxIxO, x_DxIxB, w_DxOxI):
  """Each neuron's (O, I) @ (I, B): (D, O, B). `w_DxOxI` is `w_DxIxO`
  transposed, a constant (the gradient reaches the weight through `w_DxIxO`).

  Every matmul of both passes contracts the minor axis of one operand with
  the major axis of the other: the input gradient multiplies by `w_DxIxO`, the
  weight gradient by the output cotangent transposed, into (D, I, O).
  Autodiff's contract two minor axes, which XLA:CPU runs 2-3x slower at the
  NLMs' sizes (docs/performance.md)."""
  return jnp.einsum('doi,dib->dob', w_DxOxI, x_DxIxB)


def _private_matmul_fwd(w_DxIxO, x_DxIxB, w_DxOxI):
  return private_matmul(w_DxIxO, x_DxIxB, w_DxOxI), (w_DxIxO, x_DxIxB)


def _private_matmul_bwd(residuals, dy_DxOxB):
  w_DxIxO, x_DxIxB = residuals
  dx_DxIxB = jnp.einsum('dio,dob->dib', w_DxIxO, dy_DxOxB)
  # The barrier keeps the transpose: XLA would fold it back into the dot.
  dy_DxBxO = jax.lax.optimization_barrier(jnp.swapaxes(dy_DxOxB, 1, 2))
  dw_DxIxO = jnp.einsum('dib,dbo->dio', x_DxIxB, dy_DxBxO)
  return dw_DxIxO, dx_DxIxB, None


private_matmul.defvjp(_private_matmul_fwd, _private_matmul_bwd)


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
