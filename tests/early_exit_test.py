"""Per-example early exit equals running every tick and picking each example's
first tick past the threshold; examples do not depend on each other."""

import jax
import numpy as np
import pytest

from ctm_jax import tasks
from ctm_jax.configs import image as image_configs
from ctm_jax.configs import parity as parity_configs


def _model(config, scale=1.0, head_scale=30.0):
  """A smoke model whose certainties vary across examples and ticks: its
  initial parameters scaled up (`scale`, the output head by `head_scale` more)
  into a regime where each example's certainty rises and falls on its own."""
  task = tasks.get(config.task)
  model = task.make_model(config)
  inputs = task.model_inputs(task.synthetic_batch(config, 8, seed=1))
  variables = model.init(jax.random.key(0), inputs)
  variables['params'] = jax.tree.map(lambda a: a * scale, variables['params'])
  head = variables['params']['tick']['output_projector_0']
  head['kernel'] = head['kernel'] * head_scale
  return model, variables, inputs


def _full_run(model, variables, inputs, max_ticks):
  full = jax.jit(model.clone(iterations=max_ticks).apply)(variables, inputs)
  return np.asarray(full.predictions), np.asarray(full.certainties)


def _brute_force(full, threshold, max_ticks):
  """Each example's outputs at its first tick with certainty >= threshold."""
  predictions_BxOxT, certainties_Bx2xT = full
  sure_BxT = certainties_Bx2xT[:, 1] >= threshold
  stopped_B = sure_BxT.any(axis=1)
  tick_B = np.where(stopped_B, sure_BxT.argmax(axis=1), max_ticks - 1)
  rows = np.arange(len(tick_B))
  return predictions_BxOxT[rows, :, tick_B], certainties_Bx2xT[rows, :, tick_B], tick_B + 1, stopped_B


CONFIGS = {  # name -> (config, scale, head_scale)
    'parity': (lambda: parity_configs.get_config('smoke'), 10.0, 10.0),
    'image': (lambda: image_configs.get_config('smoke'), 1.0, 30.0),
}


@pytest.mark.parametrize(
    'name', ['parity', pytest.param('image', marks=pytest.mark.slow)]  # the image model: slow tier
)
def test_early_exit_equals_brute_force_at_random_thresholds(name):
  make, scale, head_scale = CONFIGS[name]
  model, variables, inputs = _model(make(), scale, head_scale)
  run = jax.jit(
      lambda v, x, th, max_ticks: model.apply(v, x, exit_threshold=th, max_ticks=max_ticks),
      static_argnums=3,
  )
  rng = np.random.default_rng(0)
  ticks = model.iterations
  certainty_BxT = _full_run(model, variables, inputs, ticks)[1][:, 1]
  # Thresholds inside the certainties seen, so examples stop at different ticks.
  thresholds = np.quantile(certainty_BxT, rng.uniform(0.05, 0.95, 5)).astype(np.float32)
  spread = set()
  for max_ticks in (ticks, 2 * ticks):  # beyond the trained ticks too
    full = _full_run(model, variables, inputs, max_ticks)
    for threshold in [*thresholds, np.float32(1.01)]:
      got = run(variables, inputs, threshold, max_ticks)
      predictions, certainties, ticks_B, stopped_B = _brute_force(full, threshold, max_ticks)
      np.testing.assert_array_equal(got.ticks, ticks_B)
      np.testing.assert_array_equal(got.stopped, stopped_B)
      np.testing.assert_allclose(got.predictions, predictions, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(got.certainties, certainties, rtol=1e-5, atol=1e-5)
      if threshold > 1:  # never sure: every example runs every tick
        assert np.all(got.ticks == max_ticks) and not np.any(got.stopped)
      spread.add(tuple(np.asarray(got.ticks).tolist()))
  assert len(spread) > 3, spread

def test_early_exit_examples_do_not_depend_on_the_batch():
  model, variables, inputs = _model(parity_configs.get_config('smoke'), 10.0, 10.0)
  certainty_BxT = _full_run(model, variables, inputs, model.iterations)[1][:, 1]
  # Some stop at the first tick: the threshold in the widest gap between the
  # examples' first-tick certainties, so that none sits on it (batch 1 and
  # batch B may round a matmul differently in the last bit).
  first = np.unique(certainty_BxT[:, 0])
  gap = int(np.argmax(np.diff(first)))
  assert first[gap + 1] - first[gap] > 1e-4, first
  threshold = np.float32((first[gap] + first[gap + 1]) / 2)
  run = jax.jit(lambda x: model.apply(variables, x, exit_threshold=threshold))
  together = run(inputs)
  assert len(set(np.asarray(together.ticks).tolist())) > 1  # examples stop at different ticks
  for i in range(len(inputs)):
    alone = run(inputs[i : i + 1])
    assert int(alone.ticks[0]) == int(together.ticks[i])
    np.testing.assert_allclose(alone.predictions[0], together.predictions[i], rtol=1e-5, atol=1e-5)
