"""Evaluation as the CTM paper reports it: the eval step's per-example arrays,
their whole-set summary against brute force, attention gifs, and a run end to end.

Dimension glossary: B batch, N examples, C classes, T ticks, K thresholds,
h x w attended feature map, A top classes shown.
"""

import json
import math
import re
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from ctm_jax.analysis import evaluation
from ctm_jax.analysis import metrics
from ctm_jax.analysis import plots
from ctm_jax.configs import image
from ctm_jax.configs import parity
from ctm_jax import evaluators
from ctm_jax.models import ctm as ctm_lib
from ctm_jax import steps
from ctm_jax import tasks
from ctm_jax import validation

# grain worker processes read absl flags; tests do not parse a command line.
flags.FLAGS.mark_as_parsed()

THRESHOLDS = (0.1, 0.3, 0.5, 0.9)


class _KnownLogits:
  """Stands in for the model: its 'input' is the logits (B, C, T) it returns."""

  def apply(self, variables, logits_BxCxT):
    del variables
    certainty_BxT = jax.vmap(lambda p: ctm_lib.certainty(p, (-1,)), in_axes=2, out_axes=2)(
        logits_BxCxT
    )
    return ctm_lib.CTMOutput(
        predictions=logits_BxCxT,
        certainties=certainty_BxT,
        synch_out=jnp.zeros((logits_BxCxT.shape[0], 1)),
    )


def _state():
  return steps.TrainState(
      step=jnp.zeros((), jnp.int32), params={}, opt_state=(), batch_stats={}, synch={}, rng=None
  )


def _known_logits(seed=0, n=96, c=7, t=6):
  """Random logits, with rows of integers (many ties) and sharp rows (high certainty)."""
  rng = np.random.default_rng(seed)
  logits_NxCxT = rng.normal(size=(n, c, t)).astype(np.float32)
  logits_NxCxT[: n // 4] = rng.integers(0, 3, size=(n // 4, c, t))
  logits_NxCxT[n // 4 : n // 2] *= np.linspace(1, 12, t, dtype=np.float32)
  labels_N = rng.integers(0, c, size=n).astype(np.int32)
  return logits_NxCxT, labels_N


def _per_example(logits_NxCxT, labels_N, batch_size=32):
  """The image task's eval step over batches of the known logits, joined on the host."""
  config = image.get_config('smoke')
  eval_step = jax.jit(steps.make_eval_step(config, _KnownLogits(), tasks.get(config.task)))
  batches = []
  for start in range(0, len(labels_N), batch_size):
    rows = slice(start, start + batch_size)
    _, per_example = eval_step(_state(), {'inputs': logits_NxCxT[rows], 'targets': labels_N[rows]})
    assert all(v.shape[0] == len(labels_N[rows]) for v in per_example.values())
    batches.append(jax.device_get(per_example))
  return evaluation.concatenate(batches)


# ---------------------------------------------------------------------------
# Per-example arrays and their summary.


def test_eval_step_per_example_arrays_match_numpy():
  logits, labels = _known_logits()
  got = _per_example(logits, labels)
  assert set(got) == {
      'correct_BxT',
      'certainty_BxT',
      'most_certain_B',
      'top5_BxT',
      'confidence_BxT',
  }
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  certainty = 1 + (probs * np.log(probs)).sum(1) / math.log(logits.shape[1])
  np.testing.assert_allclose(got['certainty_BxT'], certainty, atol=1e-5)
  np.testing.assert_array_equal(got['most_certain_B'], got['certainty_BxT'].argmax(1))
  np.testing.assert_allclose(got['confidence_BxT'], probs.max(1), rtol=1e-5)
  np.testing.assert_array_equal(got['correct_BxT'], logits.argmax(1) == labels[:, None])
  # Ties count against the label on device as on the host.
  np.testing.assert_array_equal(got['top5_BxT'], metrics.top_k_correct(logits, labels, 5))
  assert 0 < got['top5_BxT'].mean() < 1


def test_top5_takes_every_class_when_there_are_fewer():
  logits = np.random.default_rng(0).normal(size=(8, 3, 2)).astype(np.float32)
  got = _per_example(logits, np.zeros(8, np.int32), batch_size=8)
  assert got['top5_BxT'].all()


def _brute_force_ece(confidence, correct, bins=15):
  ece = 0.0
  for b in range(bins):
    lo, hi = b / bins, (b + 1) / bins
    members = (confidence > lo) & (confidence <= hi) if b else (confidence <= hi)
    if members.any():
      ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
  return ece


def _brute_force_stop(certainty_T, threshold):
  for tick, c in enumerate(certainty_T):
    if c >= threshold:
      return tick
  return len(certainty_T) - 1


def _evaluate(config, per_example, plot_dir, step=7):
  """The task's evaluators on a held-out pass of known per-example arrays:
  (scalars, the adaptive-compute table they wrote)."""
  task = tasks.get(config.task)
  context = evaluators.Context(
      config=config,
      task=task,
      model=None,
      run=None,
      eval_source=None,
      eval_batches=[],
      plot_dir=str(plot_dir),
      started=time.perf_counter(),
      _cache=(step, per_example, 0.25),
  )
  found = task.evaluators(config, context)
  for evaluator in found:
    if isinstance(evaluator, evaluators.AdaptiveCompute):
      evaluator.thresholds = THRESHOLDS
  scalars = {}
  for evaluator in found:
    scalars.update(evaluator.run(None, step))
  assert scalars.pop('eval/loss') == 0.25
  assert 0 <= scalars.pop('eval/elapsed_s') < 60
  certainty_last = scalars.pop('eval/certainty_last')
  assert certainty_last == pytest.approx(per_example['certainty_BxT'][:, -1].mean())
  assert (plot_dir / f'eval_ticks_{step:07d}.png').exists()
  assert (plot_dir / f'adaptive_compute_{step:07d}.png').exists()
  adaptive = json.loads((plot_dir / f'adaptive_compute_{step:07d}.json').read_text())
  assert adaptive.pop('step') == step
  return scalars, adaptive


def test_summary_matches_brute_force_on_known_logits(tmp_path):
  logits, labels = _known_logits(1)
  per_example = _per_example(logits, labels)
  scalars, adaptive = _evaluate(image.get_config('smoke'), per_example, tmp_path)
  n, c, t = logits.shape
  # Brute force from the logits alone, one example and tick at a time.
  top1 = np.zeros((n, t))
  top5 = np.zeros((n, t))
  confidence = np.zeros((n, t))
  certainty = np.zeros((n, t))
  for i in range(n):
    for tick in range(t):
      z = logits[i, :, tick].astype(np.float64)
      p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
      # Top-1 is the task's argmax (the first of tied maxima); top-5 counts ties against.
      top1[i, tick] = int(np.argmax(z)) == labels[i]
      top5[i, tick] = sum(z[k] >= z[labels[i]] for k in range(c) if k != labels[i]) < 5
      confidence[i, tick] = p.max()
      certainty[i, tick] = 1 + (p * np.log(p)).sum() / np.log(c)
  most_certain = certainty.argmax(1)
  rows = np.arange(n)
  want = {
      'eval/acc_last': top1[:, -1].mean(),
      'eval/acc_most_certain': top1[rows, most_certain].mean(),
      'eval/top5_last': top5[:, -1].mean(),
      'eval/top5_most_certain': top5[rows, most_certain].mean(),
      'eval/most_certain_tick': most_certain.mean(),
      'eval/ece_last': _brute_force_ece(confidence[:, -1], top1[:, -1]),
      'eval/ece_most_certain': _brute_force_ece(
          confidence[rows, most_certain], top1[rows, most_certain]
      ),
  }
  for tick in range(t):
    want[f'eval/acc_tick_{tick}'] = top1[:, tick].mean()
    want[f'eval/top5_tick_{tick}'] = top5[:, tick].mean()
    want[f'eval/ece_tick_{tick}'] = _brute_force_ece(confidence[:, tick], top1[:, tick])
  for th in THRESHOLDS:
    stops = np.array([_brute_force_stop(certainty[i], th) for i in range(n)])
    want[f'eval/adaptive_acc_{th:g}'] = top1[rows, stops].mean()
    want[f'eval/adaptive_ticks_{th:g}'] = (stops + 1).mean()
  assert set(scalars) == set(want)
  for key, value in want.items():
    assert scalars[key] == pytest.approx(value, abs=1e-5), key
  # The sharp rows reach every threshold before the last tick; some rows never do.
  assert min(adaptive['mean_ticks']) < t
  assert adaptive['ticks'] == t and adaptive['examples'] == n
  assert adaptive['acc_last'] == scalars['eval/acc_last']
  json.dumps(adaptive)  # JSON-ready
  assert 'threshold' in metrics.format_adaptive_table(adaptive)


def test_summary_without_classification_details(tmp_path):
  """Parity: per-bit accuracies, no top-5 or calibration; adaptive compute still applies."""
  rng = np.random.default_rng(2)
  n, t = 40, 5
  per_example = {
      'correct_BxT': rng.integers(0, 9, size=(n, t)) / 8,
      'certainty_BxT': np.sort(rng.random((n, t)), axis=1),
      'most_certain_B': rng.integers(0, t, size=n),
  }
  scalars, adaptive = _evaluate(parity.get_config('smoke'), per_example, tmp_path)
  assert not any(re.search('top5|ece', key) for key in scalars)
  stops = np.array([_brute_force_stop(per_example['certainty_BxT'][i], 0.5) for i in range(n)])
  assert scalars['eval/adaptive_acc_0.5'] == pytest.approx(
      per_example['correct_BxT'][np.arange(n), stops].mean()
  )
  assert adaptive['thresholds'] == list(THRESHOLDS)


# ---------------------------------------------------------------------------
# Attention: the feature-map grid, the tracked step, the gif.


def _tiny_image_model(image_shape):
  config = image.get_config('smoke')
  config.image_shape = image_shape
  task = validation.validate(config)
  model = task.make_model(config)
  return config, model


@pytest.mark.parametrize('image_shape, grid', [((16, 16, 3), (8, 8)), ((16, 24, 3), (8, 12))])
def test_feature_grid_matches_the_attention_step(image_shape, grid):
  """The grid is the backbone's map (not a square guessed from N); shapes only, no compile."""
  config, model = _tiny_image_model(image_shape)
  assert evaluators.feature_grid(model, image_shape) == grid
  images = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
  state = jax.eval_shape(
      lambda x: steps.init_state(model, optax.sgd(0.1), jax.random.key(1), x[:1]), images
  )
  tracked = jax.eval_shape(evaluators.make_attention_step(model, 3), state, images)
  ticks = config.model.iterations
  assert tracked['attention_BxTxN'].shape == (2, ticks, grid[0] * grid[1])
  assert tracked['top_probs_BxTxA'].shape == tracked['top_classes_BxTxA'].shape == (2, ticks, 3)
  assert tracked['certainty_BxT'].shape == (2, ticks)


def test_attention_gif_has_a_frame_per_tick(tmp_path):
  rng = np.random.default_rng(0)
  ticks = 4
  path = plots.attention_gif(
      rng.normal(size=(12, 20, 1)),
      rng.random((ticks, 3, 5)),
      np.full((ticks, 2), 0.5),
      np.tile([1, 0], (ticks, 1)),
      np.linspace(0, 1, ticks),
      tmp_path / 'a.gif',
      label=1,
  )
  with Image.open(path) as gif:
    assert gif.format == 'GIF' and gif.n_frames == ticks


def test_n_attention_gifs_is_validated():
  config = image.get_config('smoke')
  assert config.n_attention_gifs == 0
  config.n_attention_gifs = -1
  with pytest.raises(ValueError, match=re.escape('config.n_attention_gifs=-1')):
    validation.validate(config)
  # An image-task key: parity has no gifs to make.
  assert 'n_attention_gifs' not in parity.get_config('smoke')
