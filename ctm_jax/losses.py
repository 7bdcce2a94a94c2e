"""Per-tick losses of the CTM, as in the reference's `utils/losses.py`.

Every task loss computes a cross-entropy per sample and tick, L (B, T), then
averages two ticks per sample: the tick of minimum loss and the most certain
tick (or the last tick when `use_most_certain=False`):
  loss = (mean_b L[b, argmin_t L] + mean_b L[b, argmax_t certainty]) / 2.

Dimension glossary: B batch, T ticks, C classes, L parity sequence length,
R maze route length.
"""

import jax
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


def image_classification_loss(
    predictions_BxCxT, certainties_Bx2xT, targets_B, use_most_certain: bool = True
):
  """Loss for classification (images, Q&A-MNIST); returns (loss, most_certain_B)."""
  loss_BxT = per_tick_cross_entropy(predictions_BxCxT, targets_B)
  return select_ticks(loss_BxT, certainties_Bx2xT, use_most_certain)


def parity_loss(predictions_BxOxT, certainties_Bx2xT, targets_BxL, use_most_certain: bool = True):
  """Cumulative-parity loss; predictions (B, 2L, T) or (B, L, 2, T).

  The cross-entropy is averaged over sequence positions before tick selection.
  """
  batch, ticks = predictions_BxOxT.shape[0], predictions_BxOxT.shape[-1]
  logits_BxLx2xT = predictions_BxOxT.reshape(batch, -1, 2, ticks)
  loss_BxLxT = jax.vmap(per_tick_cross_entropy, in_axes=(1, 1), out_axes=1)(
      logits_BxLx2xT, targets_BxL
  )
  return select_ticks(loss_BxLxT.mean(1), certainties_Bx2xT, use_most_certain)


def maze_loss(
    predictions_BxOxT,
    certainties_Bx2xT,
    targets_BxR,
    cirriculum_lookahead: int = 5,
    use_most_certain: bool = True,
):
  """Maze route loss with the reference's auto-curriculum.

  Only route steps before `upto` count, where `upto` is the end of the longest
  correctly predicted route prefix (best tick) plus `cirriculum_lookahead`.
  Returns (loss, most_certain_B, upto_B).
  """
  batch, ticks = predictions_BxOxT.shape[0], predictions_BxOxT.shape[-1]
  logits_BxRx5xT = predictions_BxOxT.reshape(batch, targets_BxR.shape[1], -1, ticks)
  route = targets_BxR.shape[1]
  loss_BxRxT = jax.vmap(per_tick_cross_entropy, in_axes=(1, 1), out_axes=1)(
      logits_BxRx5xT, targets_BxR
  )
  correct_BxRxT = jnp.argmax(logits_BxRx5xT, axis=2) == targets_BxR[..., None]
  # A step counts as solved when every step up to it is correct.
  prefix_BxRxT = jnp.cumsum(correct_BxRxT, axis=1) == jnp.arange(1, route + 1)[None, :, None]
  prefix_BxRxT = prefix_BxRxT.at[:, 0].set(True)
  # argmax of the cumulative sum = last solved step (first index of the max).
  last_solved_BxT = jnp.argmax(jnp.cumsum(prefix_BxRxT, axis=1), axis=1)
  upto_B = last_solved_BxT.max(-1) + cirriculum_lookahead
  mask_BxR = (jnp.arange(route)[None, :] < upto_B[:, None]).astype(loss_BxRxT.dtype)
  loss_BxT = (loss_BxRxT * mask_BxR[..., None]).sum(1) / mask_BxR.sum(1)[:, None]
  loss, chosen_B = select_ticks(loss_BxT, certainties_Bx2xT, use_most_certain)
  return loss, chosen_B, upto_B
