"""Whole-eval-set metrics from the eval step's per-example arrays (host side).

The eval step (ctm_jax/steps.py) returns, per batch, the arrays the task's
`eval_arrays` names (every task: `correct_BxT`, `certainty_BxT`,
`most_certain_B`; classification adds `top5_BxT`, `confidence_BxT`).
`concatenate` joins the batches; each function below turns some of them into
the scalars the CTM paper reports, for the evaluator that asks
(ctm_jax/evaluators.py).

Dimension glossary: B batch, N examples, T ticks, K thresholds.
"""

import numpy as np

from ctm_jax.analysis import metrics


def concatenate(batches: list[dict]) -> dict[str, np.ndarray]:
  """Per-batch dicts of (B, ...) arrays -> one dict of (N, ...) arrays."""
  return {key: np.concatenate([np.asarray(b[key]) for b in batches]) for key in batches[0]}


def at_ticks(values_NxT, ticks_N):
  """(N,) each example's value at its own tick."""
  return values_NxT[np.arange(len(ticks_N)), ticks_N]


def per_tick(values_NxT, most_certain_N, prefix: str, name: str) -> dict[str, float]:
  """Mean of a per-example per-tick score at each tick, at each example's
  most-certain tick and at the last tick: `prefix/name_tick_<t>`,
  `prefix/name_most_certain`, `prefix/name_last`."""
  values_NxT = np.asarray(values_NxT, np.float64)
  most_certain_N = np.asarray(most_certain_N, np.int64)
  scalars = {
      f'{prefix}/{name}_most_certain': float(at_ticks(values_NxT, most_certain_N).mean()),
      f'{prefix}/{name}_last': float(values_NxT[:, -1].mean()),
  }
  scalars.update({f'{prefix}/{name}_tick_{t}': float(a) for t, a in enumerate(values_NxT.mean(0))})
  return scalars


def calibration(
    confidence_NxT, correct_NxT, most_certain_N, prefix: str, num_bins: int = 15
) -> dict[str, float]:
  """Expected calibration error per tick, at the last and at the most-certain tick."""
  confidence_NxT = np.asarray(confidence_NxT, np.float64)
  correct_NxT = np.asarray(correct_NxT, np.float64)
  most_certain_N = np.asarray(most_certain_N, np.int64)
  ece_T = metrics.calibration_error(confidence_NxT, correct_NxT, num_bins)
  scalars = {
      f'{prefix}/ece_last': float(ece_T[-1]),
      f'{prefix}/ece_most_certain': float(
          metrics.calibration_error(
              at_ticks(confidence_NxT, most_certain_N)[:, None],
              at_ticks(correct_NxT, most_certain_N)[:, None],
              num_bins,
          )[0]
      ),
  }
  scalars.update({f'{prefix}/ece_tick_{t}': float(e) for t, e in enumerate(ece_T)})
  return scalars


def adaptive(
    correct_NxT, certainty_NxT, most_certain_N, prefix: str, thresholds=metrics.DEFAULT_THRESHOLDS
) -> tuple[dict[str, float], dict]:
  """Accuracy against ticks used when each example stops at its first tick this
  certain: scalars `prefix/adaptive_acc_{threshold}`, `prefix/adaptive_ticks_{threshold}`
  (mean ticks used, 1-based), and the result as JSON-ready lists."""
  correct_NxT = np.asarray(correct_NxT, np.float64)
  result = metrics.adaptive_compute(correct_NxT, np.asarray(certainty_NxT, np.float64), thresholds)
  scalars = {}
  for th, acc, used in zip(result['thresholds'], result['accuracy'], result['mean_ticks']):
    scalars[f'{prefix}/adaptive_acc_{th:g}'] = float(acc)
    scalars[f'{prefix}/adaptive_ticks_{th:g}'] = float(used)
  table = {key: [float(v) for v in values] for key, values in result.items()}
  table.update(
      ticks=correct_NxT.shape[1],
      examples=len(correct_NxT),
      acc_last=float(correct_NxT[:, -1].mean()),
      acc_most_certain=float(at_ticks(correct_NxT, np.asarray(most_certain_N, np.int64)).mean()),
  )
  return scalars, table
