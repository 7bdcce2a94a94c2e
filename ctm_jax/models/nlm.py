"""Neuron-level models: a private MLP per neuron over its pre-activation history.

Dimensions: B batch, D neurons (d_model), M memory length (history),
I input width per neuron, O output width per neuron, H NLM hidden width.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from ctm_jax.models import layers


class SuperLinear(nn.Module):
  """D independent linear maps, one per neuron, applied as one einsum.

  Parameters keep the reference's layout: w1 (I, O, D), b1 (1, D, O) and a
  learned scalar `temperature` that divides the output.
  """

  in_dims: int
  out_dims: int
  n_neurons: int
  do_norm: bool = False
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxDxI, train: bool = False):
    if self.dropout > 0:
      x_BxDxI = nn.Dropout(self.dropout, deterministic=not train)(x_BxDxI)
    if self.do_norm:
      x_BxDxI = layers.LayerNorm(name='layernorm', dtype=self.dtype)(x_BxDxI)
    bound = 1.0 / math.sqrt(self.in_dims + self.out_dims)
    w1_IxOxD = self.param(
        'w1', layers.uniform(bound), (self.in_dims, self.out_dims, self.n_neurons)
    )
    b1_1xDxO = self.param('b1', nn.initializers.zeros, (1, self.n_neurons, self.out_dims))
    temperature = self.param('temperature', nn.initializers.ones, (1,))
    # b: batch, d: neuron, i: input, o: output. One private matrix per neuron.
    y_BxDxO = jnp.einsum('bdi,iod->bdo', x_BxDxI.astype(self.dtype), w1_IxOxD.astype(self.dtype))
    y_BxDxO = y_BxDxO + b1_1xDxO.astype(self.dtype)
    return y_BxDxO / temperature.astype(self.dtype)


def neuron_level_models(
    trace_BxDxM,
    *,
    deep: bool,
    memory_hidden_dims: int,
    do_norm: bool,
    dropout: float,
    train: bool,
    dtype
):
  """Post-activations z (B, D) from the pre-activation trace (B, D, M).

  Call inside a compact method: layers are named after the reference's
  `trace_processor.0.{0,2}` so weights import one to one.
  """
  _, n_neurons, memory_length = trace_BxDxM.shape
  common = dict(n_neurons=n_neurons, do_norm=do_norm, dropout=dropout, dtype=dtype)
  h_BxDxO = trace_BxDxM
  if deep:
    h_BxDxO = SuperLinear(
        memory_length, 2 * memory_hidden_dims, name='trace_processor_0_0', **common
    )(h_BxDxO, train)
    h_BxDxO = nn.glu(h_BxDxO, axis=-1)
    h_BxDxO = SuperLinear(memory_hidden_dims, 2, name='trace_processor_0_2', **common)(
        h_BxDxO, train
    )
  else:
    h_BxDxO = SuperLinear(memory_length, 2, name='trace_processor_0_0', **common)(h_BxDxO, train)
  # The last GLU maps the 2-wide output to one value per neuron.
  return nn.glu(h_BxDxO, axis=-1)[..., 0]
