"""Host-side evaluation metrics over ticks: top-k, calibration, adaptive compute.

Inputs are NumPy arrays gathered over an evaluation set.

Dimension glossary: N examples, C classes, T ticks, K thresholds, S bins.
"""

import numpy as np

# Certainty thresholds of the adaptive-compute table (the paper's ImageNet figure).
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def top_k_correct(logits_NxCxT: np.ndarray, labels_N: np.ndarray, k: int) -> np.ndarray:
  """Whether the label is among the k largest logits, per example and tick: (N, T) bool."""
  n, c, _ = logits_NxCxT.shape
  if not 1 <= k <= c:
    raise ValueError(f'k={k} must lie in [1, {c}]')
  label_logit_NxT = logits_NxCxT[np.arange(n), labels_N]
  # Ties count against the label, so a constant prediction is never correct by luck.
  above_NxT = (logits_NxCxT >= label_logit_NxT[:, None, :]).sum(axis=1) - 1
  return above_NxT < k


def expected_calibration_error(
    probs_NxCxT: np.ndarray, labels_N: np.ndarray, num_bins: int = 15
) -> np.ndarray:
  """ECE per tick, (T,): confidence = top class probability, equal-width bins on [0, 1]."""
  confidence_NxT = probs_NxCxT.max(axis=1)
  correct_NxT = probs_NxCxT.argmax(axis=1) == labels_N[:, None]
  return calibration_error(confidence_NxT, correct_NxT, num_bins)


def calibration_error(
    confidence_NxT: np.ndarray, correct_NxT: np.ndarray, num_bins: int = 15
) -> np.ndarray:
  """ECE per tick, (T,), from each prediction's confidence and whether it was right."""
  n, ticks = confidence_NxT.shape
  correct_NxT = np.asarray(correct_NxT, dtype=np.float64)
  # Bin b holds confidences in (b/S, (b+1)/S]; a confidence of 0 joins bin 0.
  bins_NxT = np.clip(np.ceil(confidence_NxT * num_bins).astype(int) - 1, 0, num_bins - 1)
  ece_T = np.zeros(ticks)
  for t in range(ticks):
    conf_S = np.bincount(bins_NxT[:, t], confidence_NxT[:, t], minlength=num_bins)
    acc_S = np.bincount(bins_NxT[:, t], correct_NxT[:, t], minlength=num_bins)
    ece_T[t] = np.abs(acc_S - conf_S).sum() / n
  return ece_T


def adaptive_compute(
    correct_NxT: np.ndarray,
    certainty_NxT: np.ndarray,
    thresholds=DEFAULT_THRESHOLDS,
) -> dict[str, np.ndarray]:
  """Each example stops at its first tick whose certainty reaches the threshold
  (the last tick when none does).

  Returns, per threshold (K,): `accuracy` at the stopping tick, `mean_ticks`
  used (1-based), and `stopped_early`, the fraction that stopped before the last tick.
  """
  n, ticks = correct_NxT.shape
  thresholds_K = np.asarray(thresholds, dtype=np.float64)
  reached_KxNxT = certainty_NxT[None] >= thresholds_K[:, None, None]
  any_KxN = reached_KxNxT.any(axis=2)
  stop_KxN = np.where(any_KxN, reached_KxNxT.argmax(axis=2), ticks - 1)
  correct_KxN = correct_NxT[np.arange(n)[None, :], stop_KxN]
  return {
      'thresholds': thresholds_K,
      'accuracy': correct_KxN.mean(axis=1),
      'mean_ticks': (stop_KxN + 1).mean(axis=1),
      'stopped_early': (stop_KxN < ticks - 1).mean(axis=1),
  }


def format_adaptive_table(result: dict[str, np.ndarray]) -> str:
  lines = ['threshold  accuracy  mean ticks  stopped early']
  for th, acc, ticks, early in zip(
      result['thresholds'], result['accuracy'], result['mean_ticks'], result['stopped_early']
  ):
    lines.append(f'{th:9.2f}  {acc:8.4f}  {ticks:10.2f}  {early:13.3f}')
  return '\n'.join(lines)
