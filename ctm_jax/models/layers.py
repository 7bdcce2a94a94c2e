"""Small layers with the reference's (PyTorch) initialisation and numerics.

Dimensions: B batch, I input features, O output features, N positions
(ticks x batch) of a deferred weight gradient.
"""

import functools
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype

# torch.nn.LayerNorm: eps 1e-5, biased two-pass variance.
LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-5, use_fast_variance=False)


def uniform(bound: float):
  """U(-bound, bound), torch's default for Linear/Conv weights and biases."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# torch's default Linear/Conv weight init (kaiming_uniform with a=sqrt(5))
# reduces to U(+-1/sqrt(fan_in)); variance_scaling(1/3, uniform) is exactly that
# and reads fan_in = I/groups * kh * kw from a Flax (kh, kw, I/groups, O) kernel.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int):
  """torch's default bias init U(+-1/sqrt(fan_in)); Flax bias inits never see fan_in."""
  return uniform(1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)


def deferred_matmul(module: nn.Module, equation: str, x, w, newest_only: bool = False):
  """einsum(equation, x, w) whose gradient with respect to `w` is left to the
  caller (ctm_jax/models/deferred.py): `w` enters as a constant, the input is
  recorded in the 'deferred' collection and a zero 'probes' variable of the
  output's shape is added, so that the probe's cotangent is the output's.

  `newest_only`: x's second-last axis is a sliding history, newest last, that gains
  one entry per call; only that entry is recorded ('x_newest'), and the
  caller rebuilds the windows from the history.
  """
  y = jnp.einsum(equation, x, jax.lax.stop_gradient(w))
  if newest_only:
    module.put_variable('deferred', 'x_newest', x[..., -1, :])
  else:
    module.put_variable('deferred', 'x', x)
  probe = module.variable('probes', 'y', jnp.zeros, y.shape, y.dtype)
  return y + probe.value


class Linear(nn.Module):
  """Dense layer initialised like torch.nn.Linear (weight and bias U(+-1/sqrt(I))).

  `defer=True` leaves the kernel's gradient to ctm_jax/models/deferred.py
  (`deferred_matmul`); the forward is unchanged.
  """

  features: int
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer | None = None
  bias_init: nn.initializers.Initializer | None = None
  dtype: Dtype = jnp.float32
  defer: bool = False

  # With `defer`: the parameter taken out of autodiff, and those
  # `effective_weight` reads (the deferred gradient reaches each).
  DEFERRED_WEIGHT: ClassVar[str] = 'kernel'
  WEIGHT_PARAMS: ClassVar[tuple[str, ...]] = ('kernel',)

  @staticmethod
  def effective_weight(params, dtype):
    """The matrix the forward multiplies by, from this layer's params."""
    return params['kernel'].astype(dtype)

  @staticmethod
  def weight_gradient(x_NxI, dy_NxO):
    """The effective weight's gradient from the recorded inputs and output
    cotangents (any leading positions: ticks, batch), float32."""
    x_NxI = x_NxI.reshape(-1, x_NxI.shape[-1])
    dy_NxO = dy_NxO.reshape(-1, dy_NxO.shape[-1])
    return jnp.einsum('ni,no->io', x_NxI, dy_NxO, preferred_element_type=jnp.float32)

  @nn.compact
  def __call__(self, x_BxI):
    fan_in = x_BxI.shape[-1]
    default = uniform(1.0 / math.sqrt(fan_in))
    kernel_IxO = self.param(
        'kernel', self.kernel_init or default, (fan_in, self.features), jnp.float32
    )
    w_IxO = self.effective_weight({'kernel': kernel_IxO}, self.dtype)
    if self.defer:
      y_BxO = deferred_matmul(self, '...i,io->...o', x_BxI.astype(self.dtype), w_IxO)
    else:
      y_BxO = jnp.dot(x_BxI.astype(self.dtype), w_IxO)
    if self.use_bias:
      bias_O = self.param('bias', self.bias_init or default, (self.features,), jnp.float32)
      y_BxO = y_BxO + bias_O.astype(self.dtype)
    return y_BxO
