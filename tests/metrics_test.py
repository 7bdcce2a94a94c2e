"""Evaluation metrics against brute-force loops on known predictions."""

import numpy as np
import pytest

from ctm_jax.analysis import metrics


def _random(seed=0, n=200, c=7, t=6):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, c, t))
  labels = rng.integers(0, c, size=n)
  return logits, labels


def test_adaptive_compute_matches_brute_force():
  rng = np.random.default_rng(1)
  n, t = 300, 8
  correct = rng.random((n, t)) < np.linspace(0.3, 0.9, t)
  certainty = np.sort(rng.random((n, t)), axis=1) * rng.random((n, 1)) ** 0.3
  thresholds = (0.2, 0.5, 0.8, 0.99)
  got = metrics.adaptive_compute(correct, certainty, thresholds)
  for k, th in enumerate(thresholds):
    stops = []
    for i in range(n):
      stop = t - 1
      for tick in range(t):
        if certainty[i, tick] >= th:
          stop = tick
          break
      stops.append(stop)
    stops = np.array(stops)
    assert got['accuracy'][k] == pytest.approx(
        np.mean([correct[i, s] for i, s in enumerate(stops)])
    )
    assert got['mean_ticks'][k] == pytest.approx(np.mean(stops + 1))
    assert got['stopped_early'][k] == pytest.approx(np.mean(stops < t - 1))
  # Higher thresholds never stop earlier.
  assert np.all(np.diff(got['mean_ticks']) >= 0)
  assert 'threshold' in metrics.format_adaptive_table(got)


def test_adaptive_compute_known_case():
  correct = np.array([[0, 1, 1], [1, 0, 0]], bool)
  certainty = np.array([[0.1, 0.6, 0.9], [0.7, 0.8, 0.95]])
  got = metrics.adaptive_compute(correct, certainty, (0.5, 0.99))
  # 0.5: example 0 stops at tick 1 (correct), example 1 at tick 0 (correct).
  np.testing.assert_allclose(got['accuracy'], [1.0, 0.5])  # 0.99: both run to the end
  np.testing.assert_allclose(got['mean_ticks'], [1.5, 3.0])
  np.testing.assert_allclose(got['stopped_early'], [1.0, 0.0])


@pytest.mark.parametrize('k', [1, 3, 7])
def test_top_k_matches_brute_force(k):
  logits, labels = _random()
  got = metrics.top_k_correct(logits, labels, k)
  n, _, t = logits.shape
  for i in range(n):
    for tick in range(t):
      top = np.argsort(-logits[i, :, tick], kind='stable')[:k]
      assert got[i, tick] == (labels[i] in top)
  if k == 1:
    np.testing.assert_array_equal(got, logits.argmax(1) == labels[:, None])


def test_top_k_ties_count_against_the_label():
  logits = np.zeros((1, 4, 1))
  assert not metrics.top_k_correct(logits, np.array([2]), 1)[0, 0]
  assert metrics.top_k_correct(logits, np.array([2]), 4)[0, 0]


def test_expected_calibration_error_matches_brute_force():
  logits, labels = _random(2)
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  got = metrics.expected_calibration_error(probs, labels, num_bins=10)
  n, _, t = probs.shape
  for tick in range(t):
    conf = probs[:, :, tick].max(1)
    acc = probs[:, :, tick].argmax(1) == labels
    ece = 0.0
    for b in range(10):
      lo, hi = b / 10, (b + 1) / 10
      members = (conf > lo) & (conf <= hi) if b else (conf <= hi)
      if members.any():
        ece += members.sum() / n * abs(acc[members].mean() - conf[members].mean())
    assert got[tick] == pytest.approx(ece)


def test_calibrated_predictions_have_small_ece():
  rng = np.random.default_rng(3)
  n = 20000
  p = rng.uniform(0.5, 1.0, size=n)
  labels = (rng.random(n) >= p).astype(int)  # class 0 is right with probability p
  probs = np.stack([p, 1 - p], 1)[:, :, None]
  assert metrics.expected_calibration_error(probs, labels)[0] < 0.02
  overconfident = np.stack([np.full(n, 0.99), np.full(n, 0.01)], 1)[:, :, None]
  assert metrics.expected_calibration_error(overconfident, labels)[0] > 0.2


def test_calibration_error_from_confidence_and_correctness():
  logits, labels = _random(4)
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  confidence, correct = probs.max(1), probs.argmax(1) == labels[:, None]
  np.testing.assert_allclose(
      metrics.calibration_error(confidence, correct, num_bins=10),
      metrics.expected_calibration_error(probs, labels, num_bins=10),
  )
  # Any correctness in [0, 1] works (e.g. a per-bit accuracy); float and bool agree.
  np.testing.assert_allclose(
      metrics.calibration_error(confidence, correct.astype(np.float32)),
      metrics.calibration_error(confidence, correct),
  )
  # One bin: ECE is |mean accuracy - mean confidence| per tick.
  np.testing.assert_allclose(
      metrics.calibration_error(confidence, correct, num_bins=1),
      np.abs(correct.mean(0) - confidence.mean(0)),
  )
