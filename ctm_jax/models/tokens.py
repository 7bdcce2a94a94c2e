"""Models that attend over a sequence of tokens (brackets): one-hot (B, W, V)
in, embedded, given the 1-D rotational positional embedding and projected
to keys and values as parity's bits are; the attention reads the tokens and
never the padding after them (token 0). The rest is the CTM (or the LSTM
baseline) as it is.

The reference's backbones embed only parity's two values, and its 'none'
backbone takes no positional embedding; these variants embed V token kinds
(`embedding`: a linear map of the one-hot, an embedding table with a bias)
and always add `positional_embedding` ('custom-rotational-1d'), so
`backbone_type` and `positional_embedding_type` are fixed at 'none' (the
token embedding replaces both).

Dimension glossary: B batch, W sequence width, V vocabulary, E d_input.
"""

import dataclasses

import jax.numpy as jnp

from ctm_jax.models import ctm
from ctm_jax.models import layers
from ctm_jax.models import lstm
from ctm_jax.models import posemb


# PAD and ( ) [ ]: what a token model embeds when a checkpoint does not say.
BRACKETS_VOCAB = 5


def featurise_tokens(module, x_BxWxV):
  """Keys and values' tokens (B, W, E): embedding + positional embedding -> kv_proj."""
  embedded_BxWxE = layers.Linear(module.d_input, dtype=module.dtype, name='embedding')(x_BxWxV)
  pe_1xWxE = posemb.CustomRotational1D(module.d_input, module.dtype, name='positional_embedding')(embedded_BxWxE)
  kv_BxWxE = layers.Linear(module.d_input, dtype=module.dtype, name='kv_proj_0')(embedded_BxWxE + pe_1xWxE)
  return layers.LayerNorm(dtype=module.dtype, name='kv_proj_1')(kv_BxWxE)


def key_mask(x_BxWxV):
  """(B, W) bool: the positions that hold a token. Token 0 is padding, which
  the attention never reads: what a padded position holds changes nothing."""
  return x_BxWxV[..., 0] < 0.5


def check_tokens(x) -> None:
  if x.ndim != 3 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'x: {x.dtype}{tuple(x.shape)}; a token model takes one-hot tokens (B, W, V) as floats')


class _FixedFeaturisation:
  """Fixes the featurisation options the token embedding replaces."""

  def __post_init__(self):
    object.__setattr__(self, 'backbone_type', 'none')
    object.__setattr__(self, 'positional_embedding_type', 'none')
    super().__post_init__()

  def check_input(self, x) -> None:
    check_tokens(x)


class ContinuousThoughtMachineTokens(_FixedFeaturisation, ctm.ContinuousThoughtMachine):
  """The CTM attending over embedded tokens (the constructor as the CTM's)."""

  @classmethod
  def example_input(cls, state_dict, model_kwargs):
    """An input that builds an imported checkpoint's variables: V from its
    `embedding.weight` (E, V), else brackets' (a checkpoint whose embedding is
    not ours, imported not strictly); the width changes no parameter."""
    del model_kwargs
    weight = state_dict.get('embedding.weight')
    vocab = weight.shape[-1] if weight is not None and weight.ndim == 2 else BRACKETS_VOCAB
    return jnp.zeros((1, 2, vocab), jnp.float32)

  def featurise(self, x, train):
    del train
    return featurise_tokens(self, x)

  def tick_inputs(self, x, train):
    per_tick, fixed = super().tick_inputs(x, train)
    return per_tick, dataclasses.replace(fixed, key_mask_BxN=key_mask(x))


class LSTMTokens(_FixedFeaturisation, lstm.LSTMBaseline):
  """The LSTM baseline attending over embedded tokens."""

  def tick_inputs(self, x, train):
    del train
    k_BxKxNxF, v_BxKxNxF = ctm.project_kv(self, featurise_tokens(self, x))
    return ctm.TickInputs(), ctm.TickInputs(keys_BxKxNxF=k_BxKxNxF, values_BxKxNxF=v_BxKxNxF,
                                            key_mask_BxN=key_mask(x))

