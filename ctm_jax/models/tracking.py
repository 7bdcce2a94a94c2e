"""Models that watch frames one after another (tracking): the CTM and the LSTM
baseline attend to frame f on ticks [f k, (f + 1) k) (k = ticks_per_frame),
as Q&A-MNIST's models attend to one digit at a time, and to the last frame
on the ticks after it, until `iterations`.

Each frame is a G x G map cut into patches of P x P cells (ViT's patch
embedding: Linear P*P*C -> E, so a patch's embedding says where in it the
object is), plus the 2-D rotational positional embedding over the G/P x G/P
patch grid ('custom-rotational'), through kv_proj and the attention's key /
value projections, all frames at once, outside the tick loop. Patches, not
cells: over 256 cells a lone lit cell gets 1/256 of the attention at init
and the run did not leave chance in 3,500 steps; over 16 patches it gets
1/16. `backbone_type` and `positional_embedding_type` are fixed at
'none': this featurisation replaces both.

Dimension glossary: B batch, F frames, G grid side, P patch side, N =
(G / P)^2 patches, E d_input, K heads, Fh head width, T ticks.
"""

import jax.numpy as jnp
import numpy as np

from ctm_jax.models import ctm
from ctm_jax.models import layers
from ctm_jax.models import lstm
from ctm_jax.models import posemb


def frame_of_tick(ticks: int, frames: int, ticks_per_frame: int) -> np.ndarray:
  """(T,) int32: the frame each tick attends to."""
  return np.minimum(np.arange(ticks) // ticks_per_frame, frames - 1).astype(np.int32)


def check_frames(x) -> None:
  if x.ndim != 5 or x.shape[2] != x.shape[3] or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'x: {x.dtype}{tuple(x.shape)}; a tracking model takes frames (B, F, G, G, C) as floats')


def tracking_tick_inputs(module, x_BxFxGxGxC):
  """(per-tick, fixed) TickInputs: every frame's keys and values as key sets,
  per tick the frame shown."""
  batch, frames, side, channels = (x_BxFxGxGxC.shape[i] for i in (0, 1, 2, 4))
  p = module.patch_size
  n = side // p
  patches = x_BxFxGxGxC.reshape(batch * frames, n, p, n, p, channels).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(batch * frames, n, n, p * p * channels)
  embedded = layers.Linear(module.d_input, dtype=module.dtype, name='embedding')(patches)
  embedded = embedded + posemb.CustomRotational(module.d_input, module.dtype, name='positional_embedding')(embedded)
  kv = layers.Linear(module.d_input, dtype=module.dtype, name='kv_proj_0')(embedded.reshape(batch * frames, n * n, -1))
  kv = layers.LayerNorm(dtype=module.dtype, name='kv_proj_1')(kv)
  k, v = ctm.project_kv(module, kv)
  key_sets, value_sets = (a.reshape(batch, frames, *a.shape[1:]) for a in (k, v))
  per_tick = ctm.TickInputs(key_set=frame_of_tick(module.iterations, frames, module.ticks_per_frame))
  return per_tick, ctm.TickInputs(key_sets_BxSxKxNxF=key_sets, value_sets_BxSxKxNxF=value_sets)


class _Frames:
  """What the tracking CTM and LSTM share: fixed featurisation options, the
  frame input, the schedule."""

  def __post_init__(self):
    object.__setattr__(self, 'backbone_type', 'none')
    object.__setattr__(self, 'positional_embedding_type', 'none')
    for field in ('ticks_per_frame', 'patch_size'):
      value = getattr(self, field)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f'{field}={value!r}: must be a positive integer')
    super().__post_init__()

  def check_input(self, x) -> None:
    check_frames(x)
    if x.shape[2] % self.patch_size:
      raise ValueError(f'patch_size={self.patch_size}: does not divide the frames\' side {x.shape[2]}')
    if x.shape[1] * self.ticks_per_frame > self.iterations:
      raise ValueError(
          f'iterations={self.iterations}: {x.shape[1]} frames x ticks_per_frame={self.ticks_per_frame} '
          'need more ticks'
      )

  def tick_inputs(self, x, train):
    del train
    return tracking_tick_inputs(self, x)


class ContinuousThoughtMachineTracking(_Frames, ctm.ContinuousThoughtMachine):
  """The CTM watching frames (the constructor as the CTM's, `ticks_per_frame`
  and `patch_size`)."""

  ticks_per_frame: int = 1
  patch_size: int = 4

  @classmethod
  def example_input(cls, state_dict, model_kwargs):
    """One frame of one patch that builds an imported checkpoint's variables:
    C from its `embedding.weight` (E, P * P * C); frames and side change no
    parameter."""
    p = int(model_kwargs.get('patch_size', 4))
    weight = state_dict.get('embedding.weight')
    channels = max(weight.shape[-1] // (p * p), 1) if weight is not None and weight.ndim == 2 else 1
    return jnp.zeros((1, 1, p, p, channels), jnp.float32)


class LSTMTracking(_Frames, lstm.LSTMBaseline):
  """The LSTM baseline watching frames."""

  ticks_per_frame: int = 1
  patch_size: int = 4
