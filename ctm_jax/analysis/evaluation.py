"""Whole-eval-set metrics from the eval step's per-example arrays (host side).

The eval step (ctm_jax/steps.py) returns, per batch, `correct_BxT`,
`certainty_BxT`, `most_certain_B` and, for classification, `top5_BxT` and
`confidence_BxT`; `concatenate` joins the batches and `summarise` turns them
into the scalars the CTM paper reports: top-1 / top-5 per tick, at the
most-certain and at the last tick, calibration per tick and accuracy against
compute when each example stops once certain enough.

Dimension glossary: B batch, N examples, T ticks, K thresholds.
"""

import numpy as np

from ctm_jax.analysis import metrics


def concatenate(batches: list[dict]) -> dict[str, np.ndarray]:
  """Per-batch dicts of (B, ...) arrays -> one dict of (N, ...) arrays."""
  return {key: np.concatenate([np.asarray(b[key]) for b in batches]) for key in batches[0]}


def _at(values_NxT, ticks_N):
  return values_NxT[np.arange(len(ticks_N)), ticks_N]


def summarise(
    per_example: dict[str, np.ndarray],
    prefix: str = 'eval',
    thresholds=metrics.DEFAULT_THRESHOLDS,
    num_bins: int = 15,
) -> tuple[dict[str, float], dict]:
  """Scalars named `prefix/...` and the adaptive-compute result (JSON-ready lists).

  Adaptive-compute scalars are `prefix/adaptive_acc_{threshold}` and
  `prefix/adaptive_ticks_{threshold}` (mean ticks used, 1-based).
  """
  correct_NxT = np.asarray(per_example['correct_BxT'], np.float64)
  certainty_NxT = np.asarray(per_example['certainty_BxT'], np.float64)
  most_certain_N = np.asarray(per_example['most_certain_B'], np.int64)
  ticks = correct_NxT.shape[1]
  scalars = {
      f'{prefix}/acc_most_certain': float(_at(correct_NxT, most_certain_N).mean()),
      f'{prefix}/acc_last': float(correct_NxT[:, -1].mean()),
      f'{prefix}/most_certain_tick': float(most_certain_N.mean()),
  }
  scalars.update({f'{prefix}/acc_tick_{t}': float(a) for t, a in enumerate(correct_NxT.mean(0))})
  if 'top5_BxT' in per_example:
    top5_NxT = np.asarray(per_example['top5_BxT'], np.float64)
    scalars[f'{prefix}/top5_most_certain'] = float(_at(top5_NxT, most_certain_N).mean())
    scalars[f'{prefix}/top5_last'] = float(top5_NxT[:, -1].mean())
    scalars.update({f'{prefix}/top5_tick_{t}': float(a) for t, a in enumerate(top5_NxT.mean(0))})
  if 'confidence_BxT' in per_example:
    confidence_NxT = np.asarray(per_example['confidence_BxT'], np.float64)
    ece_T = metrics.calibration_error(confidence_NxT, correct_NxT, num_bins)
    scalars[f'{prefix}/ece_last'] = float(ece_T[-1])
    scalars[f'{prefix}/ece_most_certain'] = float(
        metrics.calibration_error(
            _at(confidence_NxT, most_certain_N)[:, None],
            _at(correct_NxT, most_certain_N)[:, None],
            num_bins,
        )[0]
    )
    scalars.update({f'{prefix}/ece_tick_{t}': float(e) for t, e in enumerate(ece_T)})
  result = metrics.adaptive_compute(correct_NxT, certainty_NxT, thresholds)
  for th, acc, used in zip(result['thresholds'], result['accuracy'], result['mean_ticks']):
    scalars[f'{prefix}/adaptive_acc_{th:g}'] = float(acc)
    scalars[f'{prefix}/adaptive_ticks_{th:g}'] = float(used)
  adaptive = {key: [float(v) for v in values] for key, values in result.items()}
  adaptive.update(
      ticks=ticks,
      examples=len(correct_NxT),
      acc_last=scalars[f'{prefix}/acc_last'],
      acc_most_certain=scalars[f'{prefix}/acc_most_certain'],
  )
  return scalars, adaptive
