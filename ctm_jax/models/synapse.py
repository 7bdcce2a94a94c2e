"""Synapse models: mix attention output and post-activations into pre-activations.

Dimensions: B batch, D neurons (d_model), E d_input, W widths of the U-Net.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ctm_jax.models import layers

MIN_UNET_WIDTH = 16


def unet_widths(d_model: int, depth: int) -> list[int]:
  return [int(w) for w in np.linspace(d_model, MIN_UNET_WIDTH, depth)]


class SynapseUNet(nn.Module):
  """U-Net over the feature axis with LayerNorm'd skip connections."""

  d_model: int
  depth: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  defer: bool = False

  @nn.compact
  def __call__(self, x_BxI, train: bool = False):
    widths = unet_widths(self.d_model, self.depth)

    def block(h, width, name):
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
      h = layers.Linear(width, dtype=self.dtype, defer=self.defer, name=f'{name}_1')(h)
      h = layers.LayerNorm(dtype=self.dtype, name=f'{name}_2')(h)
      return nn.silu(h)

    h = layers.Linear(
        widths[0], dtype=self.dtype, defer=self.defer, name='first_projection_0'
    )(x_BxI)
    h = layers.LayerNorm(dtype=self.dtype, name='first_projection_1')(h)
    downs = [nn.silu(h)]
    for i in range(self.depth - 1):
      downs.append(block(downs[-1], widths[i + 1], f'down_projections_{i}'))
    up = downs[-1]
    for i in reversed(range(self.depth - 1)):
      up = block(up, widths[i], f'up_projections_{i}') + downs[i]
      up = layers.LayerNorm(dtype=self.dtype, name=f'skip_lns_{i}')(up)
    return up


def mlp_synapse(x_BxI, d_model: int, dropout: float, train: bool, dtype, defer: bool = False):
  """Depth-1 synapse: Dropout -> Linear(2D) -> GLU -> LayerNorm.

  Call inside a compact method: the layers become children of the caller,
  named after the reference's Sequential indices (synapses.1, synapses.3).
  """
  h = nn.Dropout(dropout, deterministic=not train)(x_BxI)
  h = layers.Linear(2 * d_model, dtype=dtype, defer=defer, name='synapses_1')(h)
  h = nn.glu(h, axis=-1)
  return layers.LayerNorm(dtype=dtype, name='synapses_3')(h)
