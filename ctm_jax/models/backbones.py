"""Feature extractors run once per example, before the tick loop.

Dimension glossary: B batch, H/W spatial height/width (input), h/w after the
backbone, C channels, L sequence length, E d_input (parity embedding width).
Feature maps are NHWC; parity sequences are (B, L, E).

Flax module names follow the PyTorch module paths with list indices fused by
an underscore (torch `layer2.0.downsample.1` -> flax `layer2_0/downsample_1`),
so the weight importer is a mechanical rename plus transposes.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctm_jax.models import layers

Dtype = Any


def _conv(
    features: int,
    kernel: int,
    stride: int,
    pad: int,
    dtype: Dtype,
    name: str,
    groups: int = 1,
    bias_fan_in: int | None = None,
) -> nn.Conv:
  """Conv with torch's init and explicit padding; `bias_fan_in` None means bias-free."""
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      feature_group_count=groups,
      use_bias=bias_fan_in is not None,
      kernel_init=layers.torch_kernel_init,
      bias_init=(
          layers.torch_bias_init(bias_fan_in) if bias_fan_in is not None else nn.initializers.zeros
      ),
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
  )


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d over the last (channel) axis.

  Differs from flax.linen.BatchNorm where torch does: the running variance is
  updated with the unbiased batch variance while the batch is normalised with
  the biased one, and `init` leaves batch_stats at (0, 1).
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x_BxHxWxC: jax.Array, use_running_average: bool, mask_B: jax.Array | None = None
  ) -> jax.Array:
    """`mask_B` ((B,) bool) leaves the unmasked images out of the training
    statistics (padding); every image is still normalised."""
    c = x_BxHxWxC.shape[-1]
    scale_C = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias_C = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))

    # Statistics in float32 even when computing in bf16.
    x32 = x_BxHxWxC.astype(jnp.float32)
    if use_running_average:
      mean_C, var_C = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x32.ndim - 1))
      if mask_B is None:
        n = x32.size // c
        if n < 2:
          raise ValueError(
              "BatchNorm in training needs more than 1 value per channel, "
              f"got input shape {x_BxHxWxC.shape}"
          )
        mean_C = jnp.mean(x32, axis=axes)
        var_C = jnp.mean(jnp.square(x32 - mean_C), axis=axes)  # biased: normalises
      else:
        weight = mask_B.astype(jnp.float32).reshape((-1,) + (1,) * (x32.ndim - 1))
        # At least two values, so an all-padding batch gives finite statistics.
        n = jnp.maximum(weight.sum() * (x32.size // (c * x32.shape[0])), 2.0)
        mean_C = jnp.sum(x32 * weight, axis=axes) / n
        var_C = jnp.sum(jnp.square(x32 - mean_C) * weight, axis=axes) / n
      # Skipped during init so fresh variables are torch's fresh buffers.
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1.0 - m) * ra_mean.value + m * mean_C
        ra_var.value = (1.0 - m) * ra_var.value + m * var_C * (n / (n - 1))
    y = (x32 - mean_C) * jax.lax.rsqrt(var_C + self.epsilon) * scale_C + bias_C
    return y.astype(self.dtype)


def _shortcut(
    x_BxHxWxC: jax.Array, out_ch: int, stride: int, dtype: Dtype, eval_bn: bool
) -> jax.Array:
  """Identity, or 1x1 conv + BN (torch `downsample.{0,1}`) when the shape changes.

  Called inside a block's compact __call__, so the submodules belong to the block.
  """
  if stride == 1 and x_BxHxWxC.shape[-1] == out_ch:
    return x_BxHxWxC
  y = _conv(out_ch, 1, stride, 0, dtype, "downsample_0")(x_BxHxWxC)
  return BatchNorm(dtype=dtype, name="downsample_1")(y, eval_bn)


class BasicBlock(nn.Module):
  """ResNet-18/34 block: 3x3 (stride) -> BN -> ReLU -> 3x3 -> BN, + shortcut, ReLU."""

  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  expansion = 1  # class constant, not a dataclass field

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
    eval_bn = not train
    out = _conv(self.planes, 3, self.stride, 1, self.dtype, "conv1")(x_BxHxWxC)
    out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, eval_bn))
    out = _conv(self.planes, 3, 1, 1, self.dtype, "conv2")(out)
    out = BatchNorm(dtype=self.dtype, name="bn2")(out, eval_bn)
    out_ch = self.planes * self.expansion
    return nn.relu(out + _shortcut(x_BxHxWxC, out_ch, self.stride, self.dtype, eval_bn))


class Bottleneck(nn.Module):
  """ResNet-50+ block: 1x1 -> 3x3 (stride) -> 1x1 (4x planes), BN after each, + shortcut."""

  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  expansion = 4  # class constant, not a dataclass field

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
    eval_bn = not train
    out = _conv(self.planes, 1, 1, 0, self.dtype, "conv1")(x_BxHxWxC)
    out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, eval_bn))
    out = _conv(self.planes, 3, self.stride, 1, self.dtype, "conv2")(out)
    out = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(out, eval_bn))
    out_ch = self.planes * self.expansion
    out = _conv(out_ch, 1, 1, 0, self.dtype, "conv3")(out)
    out = BatchNorm(dtype=self.dtype, name="bn3")(out, eval_bn)
    return nn.relu(out + _shortcut(x_BxHxWxC, out_ch, self.stride, self.dtype, eval_bn))


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
# Backbone rematerialisation of a ResNet's residual blocks (memory, not
# values), mode -> checkpoint policy: 'none' keeps every activation the
# backward pass needs; 'convs' keeps the convolutions' outputs and recomputes
# the batch norms (whose float32 intermediates were most of ImageNet's memory)
# and ReLUs, elementwise work of no extra matmul FLOPs; 'block' keeps only
# each block's input and recomputes the whole block in the backward pass (the
# standard per-block checkpointing: one more forward of the backbone).
BACKBONE_REMAT = {
    "none": None,
    "convs": jax.checkpoint_policies.dots_saveable,  # convolutions included
    "block": jax.checkpoint_policies.nothing_saveable,
}
_STEM_CH = 64
_STAGE_PLANES = (64, 128, 256, 512)


class ResNet(nn.Module):
  """The reference's ResNet trunk: 3x3 stem, max-pool, then layer1..layer{num_stages}.

  No classifier head. Output (B, h, w, planes * expansion): h = ceil(H/2) after
  layer1, halved (ceil) again by each further stage.
  """

  block: str = "basic"
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_stages: int = 4
  dtype: Dtype = jnp.float32
  remat: str = "none"  # one of BACKBONE_REMAT

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
    if self.block not in _BLOCKS:
      raise ValueError(f"ResNet block must be one of {tuple(_BLOCKS)}, got {self.block!r}")
    max_stages = min(len(self.stage_sizes), len(_STAGE_PLANES))
    if not 1 <= self.num_stages <= max_stages:
      raise ValueError(f"ResNet num_stages must be in 1..{max_stages}, got {self.num_stages}")
    check_remat(self.remat)
    block_cls = _BLOCKS[self.block]
    if self.remat != "none":
      # Every residual block is a checkpoint of its own (the stem is not: its
      # recomputation saved nothing on ImageNet). The lifted remat keeps the
      # block's name and variables (checkpoints and the PyTorch importer see
      # the same tree); `train` (argument 2, after the module and x) is a
      # Python bool.
      block_cls = nn.remat(block_cls, policy=BACKBONE_REMAT[self.remat], static_argnums=(2,))
    x = _conv(_STEM_CH, 3, 1, 1, self.dtype, "conv1")(x_BxHxWxC)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, not train))
    # Flax's max_pool pads with -inf, as torch's MaxPool2d does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in range(self.num_stages):
      for b in range(self.stage_sizes[stage]):
        stride = 2 if stage > 0 and b == 0 else 1
        x = block_cls(_STAGE_PLANES[stage], stride, dtype=self.dtype, name=f"layer{stage + 1}_{b}")(
            x, train
        )
    return x


class ParityBackbone(nn.Module):
  """Embeds a +-1 sequence: token 1 where x == 1, else 0 (so -1 -> 0)."""

  d_embedding: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxL: jax.Array, train: bool = False) -> jax.Array:
    del train  # no train-only behaviour; accepted for a uniform backbone call
    tokens_BxL = (x_BxL == 1).astype(jnp.int32)
    embed = nn.Embed(
        2,
        self.d_embedding,
        embedding_init=nn.initializers.normal(1.0),
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name="embedding",
    )
    return embed(tokens_BxL)  # (B, L, E)


class ShallowWide(nn.Module):
  """Wide two-conv backbone with GLU gating: stride 2, always 2048 output channels."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
    c_in = x_BxHxWxC.shape[-1]
    x = _conv(4096, 3, 2, 1, self.dtype, "layers_0", bias_fan_in=c_in * 9)(x_BxHxWxC)
    x = nn.glu(x, axis=-1)  # first half * sigmoid(second half), torch's GLU(dim=1)
    x = BatchNorm(dtype=self.dtype, name="layers_2")(x, not train)
    x = _conv(4096, 3, 1, 1, self.dtype, "layers_3", groups=32, bias_fan_in=(2048 // 32) * 9)(x)
    x = nn.glu(x, axis=-1)
    return BatchNorm(dtype=self.dtype, name="layers_5")(x, not train)


class MNISTBackbone(nn.Module):
  """Q&A-MNIST's digit backbone: two [conv 3x3 (d_input channels, bias) ->
  BatchNorm -> ReLU -> max-pool 2] blocks; a 28 (32) pixel digit gives 7x7
  (8x8) tokens. `mask_B` keeps padding digits out of the batch statistics."""

  d_input: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool, mask_B: jax.Array | None = None) -> jax.Array:
    x = x_BxHxWxC
    for conv, norm in (("layers_0", "layers_1"), ("layers_4", "layers_5")):
      x = _conv(self.d_input, 3, 1, 1, self.dtype, conv, bias_fan_in=x.shape[-1] * 9)(x)
      x = nn.relu(BatchNorm(dtype=self.dtype, name=norm)(x, not train, mask_B))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return x


_RESNET_CONFIGS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    # The reference's 152 has 4 blocks in layer2, not torchvision's 8.
    152: ("bottleneck", (3, 4, 36, 3)),
}
_RESNET_RE = re.compile(r"^resnet(\d+)-([1-4])$")

BACKBONE_TYPES = ("none", "parity_backbone", "shallow-wide") + tuple(
    f"resnet{depth}-{k}" for depth in _RESNET_CONFIGS for k in range(1, 5)
)


def _parse_resnet(backbone_type: str) -> tuple[str, tuple[int, ...], int] | None:
  m = _RESNET_RE.match(backbone_type)
  if m is None or int(m.group(1)) not in _RESNET_CONFIGS:
    return None
  block, sizes = _RESNET_CONFIGS[int(m.group(1))]
  return block, sizes, int(m.group(2))


def _unknown(backbone_type: str) -> ValueError:
  return ValueError(f"Unknown backbone_type={backbone_type!r}; expected one of {BACKBONE_TYPES}")


def check_remat(remat: str) -> None:
  """Raises ValueError unless `remat` is one of BACKBONE_REMAT."""
  if remat not in BACKBONE_REMAT:
    raise ValueError(f"backbone_remat={remat!r}: expected one of {list(BACKBONE_REMAT)}")


def make_backbone(
    backbone_type: str, d_input: int, dtype: Dtype = jnp.float32, remat: str = "none", **kwargs
) -> nn.Module | None:
  """Backbone module for a reference `backbone_type`; None for 'none'.

  `remat` (one of BACKBONE_REMAT) rematerialises a ResNet's residual blocks;
  the other backbones are small and ignore it. `kwargs` (e.g. name='backbone')
  go to the module constructor. Every backbone is called as `module(x, train=...)`.
  """
  check_remat(remat)
  if backbone_type == "none":
    return None
  if backbone_type == "parity_backbone":
    return ParityBackbone(d_embedding=d_input, dtype=dtype, **kwargs)
  if backbone_type == "shallow-wide":
    return ShallowWide(dtype=dtype, **kwargs)
  parsed = _parse_resnet(backbone_type)
  if parsed is None:
    raise _unknown(backbone_type)
  block, sizes, k = parsed
  return ResNet(block=block, stage_sizes=sizes, num_stages=k, dtype=dtype, remat=remat, **kwargs)


def backbone_channels(backbone_type: str, d_input: int, input_channels: int | None = None) -> int:
  """Channels of the backbone output (the reference's d_backbone)."""
  if backbone_type == "none":
    if input_channels is None:
      raise ValueError("backbone_type='none' passes the input through; give input_channels")
    return input_channels
  if backbone_type == "parity_backbone":
    return d_input
  if backbone_type == "shallow-wide":
    return 2048
  parsed = _parse_resnet(backbone_type)
  if parsed is None:
    raise _unknown(backbone_type)
  block, _, k = parsed
  return _STAGE_PLANES[k - 1] * _BLOCKS[block].expansion
