"""The feed-forward baseline for images (the reference's models/ff.py, `FFBaseline`).

1x1 conv to 3 channels -> ResNet backbone -> global average pool -> Linear(d_model)
-> ReLU -> Dropout -> Linear(out_dims). One pass, no ticks: returned as a
ctm.CTMOutput with a single tick, so that the image task's loss (which is
then plain cross-entropy) and metrics apply unchanged. Parameter names follow
the reference's state_dict: the read-out's `output_projector.3` / `.6` live
under `tick/` as every CTM read-out does (ctm_jax/interop/torch.py).

Dimension glossary: B batch, O out_dims, D d_model.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from ctm_jax.models import backbones
from ctm_jax.models import ctm
from ctm_jax.models import layers


class ReadOut(nn.Module):
  d_model: int
  out_dims: int
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, pooled_BxC, train: bool):
    hidden_BxD = layers.Linear(self.d_model, dtype=self.dtype, name='output_projector_3')(pooled_BxC)
    hidden_BxD = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(hidden_BxD))
    return layers.Linear(self.out_dims, dtype=self.dtype, name='output_projector_6')(hidden_BxD)


class FFBaseline(nn.Module):
  """`__call__(x, train=False)` on NHWC images -> ctm.CTMOutput with T = 1."""

  d_model: int
  backbone_type: str
  out_dims: int
  dropout: float = 0.0
  prediction_reshaper: tuple[int, ...] = (-1,)
  dtype: Any = jnp.float32

  attends: ClassVar[bool] = False
  decay_clamp_in_graph: ClassVar[bool] = False

  def __post_init__(self):
    if 'resnet' not in self.backbone_type:
      raise ValueError(f'backbone_type={self.backbone_type!r}: the feed-forward baseline takes a ResNet')
    object.__setattr__(self, 'prediction_reshaper', tuple(self.prediction_reshaper))
    object.__setattr__(self, 'dtype', jnp.dtype(self.dtype))
    super().__post_init__()

  @property
  def iterations(self) -> int:
    return 1

  @nn.compact
  def __call__(self, x, train: bool = False, track: bool = False) -> ctm.CTMOutput:
    del track  # nothing ticks
    if x.ndim != 4:
      raise ValueError(f'x.shape={tuple(x.shape)!r}: the feed-forward baseline takes NHWC images')
    x = ctm.initial_rgb(self, x)
    features = backbones.make_backbone(self.backbone_type, 0, self.dtype, name='backbone')(x, train=train)
    pooled_BxC = features.astype(jnp.float32).mean(axis=(1, 2))
    logits_BxO = ReadOut(self.d_model, self.out_dims, self.dropout, self.dtype, name='tick')(
        pooled_BxC, train
    ).astype(jnp.float32)
    return ctm.CTMOutput(
        predictions=logits_BxO[..., None],
        certainties=ctm.certainty(logits_BxO, self.prediction_reshaper)[..., None],
        synch_out=None,
    )
