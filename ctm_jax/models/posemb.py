"""Positional embeddings added to the backbone features before they become tokens.

Dimension glossary: B batch, H/W height/width of the feature map, L sequence
length, C channels (= d_model here, the backbone's channel count), F Fourier
features, K number of Fourier encoders.

Each module reads only the shape of its input, NHWC (B, H, W, C) or (B, L, C),
and returns an array that broadcasts against it: (1, H, W, C) or (1, L, C).
Positions are trace-time NumPy constants built as the reference builds them in
float32 (torch's linspace and deg2rad rounding included), so the embeddings
match the reference to float32 round-off.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax.models import layers

Dtype = Any


def _fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
  """float32 a*b + c rounded once, like a compiler-fused multiply-add."""
  a64, b64, c64 = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
  p = a64 * b64  # exact: two 24-bit significands fit in 53 bits
  s = p + c64
  # TwoSum: err is exactly (p + c) - s.
  bv = s - p
  err = (p - (s - bv)) + (c64 - bv)
  r = s.astype(np.float32)
  # Rounding f64 -> f32 after f64 rounding is only wrong when s sits exactly
  # halfway between two float32s and err would have broken the tie.
  toward_s = np.nextafter(r, np.where(s > r, np.float32(np.inf), np.float32(-np.inf)))
  halfway = (s != r) & (s == (r.astype(np.float64) + toward_s.astype(np.float64)) / 2)
  wrong_side = np.sign(err) == np.sign(s - r)
  return np.where(halfway & (err != 0) & wrong_side, toward_s, r).astype(np.float32)


def torch_linspace(start: float, end: float, n: int) -> np.ndarray:
  """torch.linspace(start, end, n) on CPU, float32, bit for bit.

  torch steps up from `start` for the first n//2 points and down from `end`
  for the rest, each point one fused multiply-add in float32.
  """
  start32, end32 = np.float32(start), np.float32(end)
  if n <= 1:
    return np.full((max(n, 0),), start32, np.float32)
  step = np.float32((end32 - start32) / np.float32(n - 1))
  i = np.arange(n)
  half = n // 2
  lo = _fma_f32(step, i[:half].astype(np.float32), start32)
  hi = _fma_f32(-step, (n - 1 - i[half:]).astype(np.float32), end32)
  return np.concatenate([lo, hi])


def _deg2rad(deg: np.ndarray) -> np.ndarray:
  # torch multiplies by pi/180 rounded to float32.
  return (np.asarray(deg, np.float32) * np.float32(math.pi / 180.0)).astype(np.float32)


def _half_turn_angles(n: int) -> np.ndarray:
  """n angles evenly spaced over [0, pi] radians, float32 as the reference."""
  return _deg2rad(torch_linspace(0.0, 180.0, n))


class LearnableFourier(nn.Module):
  """Learnable Fourier features of (column, row) coordinates in [0, 1], then a GLU MLP."""

  d_model: int
  gamma: float = 1 / 2.5
  f_dim: int = 256
  h_dim: int = 128
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    _, h, w, _ = x_BxHxWxC.shape
    if h < 2 or w < 2:
      # The reference divides by H-1 and W-1 and would return NaN here.
      raise ValueError(
          f"LearnableFourier needs a feature map of at least 2x2, got shape " f"{x_BxHxWxC.shape}"
      )
    cols_W = np.arange(w, dtype=np.float32) / np.float32(w - 1)
    rows_H = np.arange(h, dtype=np.float32) / np.float32(h - 1)
    # Column (x) coordinate first, as the reference.
    coords_HxWx2 = np.stack(np.broadcast_arrays(cols_W[None, :], rows_H[:, None]), axis=-1)

    wr = nn.Dense(
        self.f_dim // 2,
        use_bias=False,
        kernel_init=nn.initializers.normal(self.gamma**-2),
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name="Wr",
    )
    proj_HxWxF2 = wr(jnp.asarray(coords_HxWx2, self.dtype))
    feats_HxWxF = jnp.concatenate([jnp.cos(proj_HxWxF2), jnp.sin(proj_HxWxF2)], axis=-1)
    feats_HxWxF = feats_HxWxF * (1.0 / math.sqrt(self.f_dim))

    hid = layers.Linear(self.h_dim, dtype=self.dtype, name="mlp_0")(feats_HxWxF)
    hid = nn.glu(hid, axis=-1)  # first half * sigmoid(second half)
    y_HxWxC = layers.Linear(self.d_model, dtype=self.dtype, name="mlp_2")(hid)
    y_HxWxC = layers.LayerNorm(dtype=self.dtype, name="mlp_3")(y_HxWxC)
    return y_HxWxC[None]  # (1, H, W, C): the same for every example


class MultiLearnableFourier(nn.Module):
  """K LearnableFourier encoders with gammas spread over `gamma_range`, mixed by softmax."""

  d_model: int
  num_encoders: int = 10
  gamma_range: tuple[float, float] = (1.0, 0.1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    # The reference spaces gammas with numpy (float64), not torch.linspace.
    gammas = np.linspace(self.gamma_range[0], self.gamma_range[1], self.num_encoders)
    encoders = [
        LearnableFourier(self.d_model, gamma=float(g), dtype=self.dtype, name=f"embedders_{k}")
        for k, g in enumerate(gammas)
    ]
    pes_KxHxWxC = jnp.stack([enc(x_BxHxWxC)[0] for enc in encoders])
    combination_K = self.param(
        "combination", nn.initializers.ones, (self.num_encoders,), jnp.float32
    )
    weights_K = jax.nn.softmax(combination_K).astype(self.dtype)
    return jnp.einsum("k,khwc->hwc", weights_K, pes_KxHxWxC)[None]  # (1, H, W, C)


def _start_vector_init(key, shape, dtype=jnp.float32):
  del key
  if shape != (2,):
    raise ValueError(f"start_vector has shape (2,), asked for {shape}")
  return jnp.array([0.0, 1.0], dtype)


class CustomRotational(nn.Module):
  """2-D rotational embedding; angles come from the width only (the reference's choice).

  A learnable start vector is rotated by W angles over [0, pi]; position (i, j)
  gets projection(concat(rot_i, rot_j)), so the output is (1, W, W, C) and only
  fits feature maps with H == W.
  """

  d_model: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    _, h, w, _ = x_BxHxWxC.shape
    if h != w:
      raise ValueError(
          "custom-rotational builds a W x W grid and needs a square feature map, "
          f"got shape {x_BxHxWxC.shape} (H={h}, W={w})"
      )
    start_2 = self.param("start_vector", _start_vector_init, (2,), jnp.float32)
    start_2 = start_2.astype(self.dtype)
    theta_W = _half_turn_angles(w)
    cos_W = jnp.asarray(np.cos(theta_W), self.dtype)
    sin_W = jnp.asarray(np.sin(theta_W), self.dtype)
    rot_Wx2 = jnp.stack(
        [cos_W * start_2[0] - sin_W * start_2[1], sin_W * start_2[0] + cos_W * start_2[1]],
        axis=-1,
    )
    # key[i, j] = concat(rot[i], rot[j]); i runs along the height axis.
    key_WxWx4 = jnp.concatenate(
        [
            jnp.broadcast_to(rot_Wx2[:, None, :], (w, w, 2)),
            jnp.broadcast_to(rot_Wx2[None, :, :], (w, w, 2)),
        ],
        axis=-1,
    )
    pe_WxWxC = layers.Linear(self.d_model, dtype=self.dtype, name="projection_0")(key_WxWx4)
    return pe_WxWxC[None]  # (1, W, W, C)


class CustomRotational1D(nn.Module):
  """1-D rotational embedding: [0, 1] rotated by L angles over [0, pi], then projected."""

  d_model: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxC: jax.Array) -> jax.Array:
    length = x_BxLxC.shape[1]
    theta_L = _half_turn_angles(length)
    # Rotating the fixed vector (0, 1) by theta gives (-sin, cos).
    rot_Lx2 = np.stack([-np.sin(theta_L), np.cos(theta_L)], axis=-1)
    pe_LxC = layers.Linear(self.d_model, dtype=self.dtype, name="projection")(
        jnp.asarray(rot_Lx2, self.dtype)
    )
    return pe_LxC[None]  # (1, L, C)


_POSEMB_CLASSES = {
    "learnable-fourier": LearnableFourier,
    "multi-learnable-fourier": MultiLearnableFourier,
    "custom-rotational": CustomRotational,
    "custom-rotational-1d": CustomRotational1D,
}
POSITIONAL_EMBEDDING_TYPES = ("none",) + tuple(_POSEMB_CLASSES)


def make_positional_embedding(
    kind: str, d_model: int, dtype: Dtype = jnp.float32, name: str = "positional_embedding"
) -> nn.Module | None:
  """Module for a reference `positional_embedding_type`; None for 'none' (adds nothing)."""
  if kind == "none":
    return None
  if kind not in _POSEMB_CLASSES:
    raise ValueError(
        f"Unknown positional_embedding_type={kind!r}; expected one of "
        f"{POSITIONAL_EMBEDDING_TYPES}"
    )
  return _POSEMB_CLASSES[kind](d_model=d_model, dtype=dtype, name=name)
