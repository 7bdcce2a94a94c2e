"""Losses against direct NumPy definitions."""

import jax
import numpy as np
import pytest

from ctm_jax.tasks import image
from ctm_jax.tasks import mazes
from ctm_jax.tasks import parity


def _ce(logits_BxCxT, targets_B):
  shifted = logits_BxCxT - logits_BxCxT.max(1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  return -np.take_along_axis(log_p, targets_B[:, None, None], 1)[:, 0]


def _random(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize('use_most_certain', [True, False])
def test_image_loss_selects_min_loss_and_certain_ticks(use_most_certain):
  logits, cert = _random((4, 7, 5)), _random((4, 2, 5), seed=1)
  targets = np.array([0, 3, 6, 2])
  loss, chosen = image.image_classification_loss(logits, cert, targets, use_most_certain)
  per_tick = _ce(logits, targets)
  rows = np.arange(4)
  want_chosen = cert[:, 1].argmax(-1) if use_most_certain else np.full(4, 4)
  want = (per_tick[rows, per_tick.argmin(1)].mean() + per_tick[rows, want_chosen].mean()) / 2
  np.testing.assert_array_equal(chosen, want_chosen)
  np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_parity_loss_averages_positions():
  logits, cert = _random((3, 2 * 6, 4)), _random((3, 2, 4), seed=2)
  targets = np.random.default_rng(3).integers(0, 2, (3, 6))
  loss, _ = parity.parity_loss(logits, cert, targets)
  per_pos = np.stack([_ce(logits.reshape(3, 6, 2, 4)[:, l], targets[:, l]) for l in range(6)], 1)
  per_tick = per_pos.mean(1)
  rows = np.arange(3)
  want = (
      per_tick[rows, per_tick.argmin(1)].mean() + per_tick[rows, cert[:, 1].argmax(-1)].mean()
  ) / 2
  np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_maze_curriculum_masks_beyond_solved_prefix():
  route, ticks = 8, 3
  targets = np.array([[0, 1, 2, 3, 4, 4, 4, 4]])
  logits = np.zeros((1, route, 5, ticks), np.float32)
  # Tick 1 solves the first 3 steps, then errs; the other ticks solve step 0 only.
  for r in range(route):
    logits[0, r, (targets[0, r] + 1) % 5, :] = 5.0
  logits[0, 0, targets[0, 0], :] = 10.0
  logits[0, :3, :, 1] = 0.0
  for r in range(3):
    logits[0, r, targets[0, r], 1] = 10.0
  cert = _random((1, 2, ticks))
  loss, _, upto = mazes.maze_loss(
      logits.reshape(1, -1, ticks), cert, targets, cirriculum_lookahead=2
  )
  assert int(upto[0]) == 2 + 2  # last solved step index 2, plus the lookahead
  per_step = np.stack([_ce(logits[:, r], targets[:, r]) for r in range(route)], 1)
  per_tick = per_step[:, :4].mean(1)
  want = (per_tick[0].min() + per_tick[0, cert[0, 1].argmax()]) / 2
  np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_losses_jit():
  logits, cert = _random((2, 10, 3)), _random((2, 2, 3))
  targets = np.array([1, 9])
  eager, _ = image.image_classification_loss(logits, cert, targets)
  jitted, _ = jax.jit(image.image_classification_loss)(logits, cert, targets)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)
