"""Per-tick losses of the CTM, as in the reference's `utils/losses.py`.

Every task loss (in its task module, ctm_jax/tasks/) computes a cross-entropy
per sample and tick, L (B, T), then averages two ticks per sample: the tick of
minimum loss and the most certain tick (or the last tick when
`use_most_certain=False`):
  loss = (mean_b L[b, argmin_t L] + mean_b L[b, argmax_t certainty]) / 2.

Dimension glossary: B batch, T ticks, C classes.
"""

import jax.numpy as jnp
import optax


def per_tick_cross_entropy(logits_BxCxT, targets_B):
  """Cross-entropy of every tick, (B, T); classes on axis 1 as in the reference."""
  logits_BxTxC = jnp.moveaxis(logits_BxCxT, 1, -1).astype(jnp.float32)
  targets_BxT = jnp.broadcast_to(targets_B[:, None], logits_BxTxC.shape[:2])
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxC, targets_BxT)


def select_ticks(loss_BxT, certainties_Bx2xT, use_most_certain: bool = True):
  """Returns (loss, most_certain_B): the min-loss / most-certain tick average."""
  batch, ticks = loss_BxT.shape
  min_loss_B = jnp.argmin(loss_BxT, axis=1)
  if use_most_certain:
    chosen_B = jnp.argmax(certainties_Bx2xT[:, 1], axis=-1)
  else:
    chosen_B = jnp.full((batch,), ticks - 1, jnp.int32)
  rows = jnp.arange(batch)
  loss = (loss_BxT[rows, min_loss_B].mean() + loss_BxT[rows, chosen_B].mean()) / 2
  return loss, chosen_B
