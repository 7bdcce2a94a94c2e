"""Models that watch frames one after another (tracking): the CTM and the LSTM
baseline attend to frame f on ticks [f k, (f + 1) k) (k = ticks_per_frame),
as Q&A-MNIST's models attend to one digit at a time, and to the last frame
on the ticks after it, until `iterations`.

Each frame is a G x G map: a cell's value (Linear 1 -> E), plus the 2-D
rotational positional embedding ('custom-rotational'), through kv_proj and
the attention's key / value projections, all frames at once, outside the
tick loop. `backbone_type` and `positional_embedding_type` are fixed at
'none': this featurisation replaces both.

Dimension glossary: B batch, F frames, G grid side, N = G * G cells,
E d_input, K heads, Fh head width, T ticks.
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
  batch, frames, side = x_BxFxGxGxC.shape[0], x_BxFxGxGxC.shape[1], x_BxFxGxGxC.shape[2]
  maps = x_BxFxGxGxC.reshape(batch * frames, side, side, -1)
  embedded = layers.Linear(module.d_input, dtype=module.dtype, name='embedding')(maps)
  embedded = embedded + posemb.CustomRotational(module.d_input, module.dtype, name='positional_embedding')(embedded)
  kv = layers.Linear(module.d_input, dtype=module.dtype, name='kv_proj_0')(embedded.reshape(batch * frames, side * side, -1))
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
    value = self.ticks_per_frame
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f'ticks_per_frame={value!r}: must be a positive integer')
    super().__post_init__()

  def check_input(self, x) -> None:
    check_frames(x)
    if x.shape[1] * self.ticks_per_frame > self.iterations:
      raise ValueError(
          f'iterations={self.iterations}: {x.shape[1]} frames x ticks_per_frame={self.ticks_per_frame} '
          'need more ticks'
      )

  def tick_inputs(self, x, train):
    del train
    return tracking_tick_inputs(self, x)


class ContinuousThoughtMachineTracking(_Frames, ctm.ContinuousThoughtMachine):
  """The CTM watching frames (the constructor as the CTM's, and `ticks_per_frame`)."""

  ticks_per_frame: int = 1


class LSTMTracking(_Frames, lstm.LSTMBaseline):
  """The LSTM baseline watching frames."""

  ticks_per_frame: int = 1
