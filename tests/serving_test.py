"""The slot-refill server gives each queued example exactly what running every
tick and picking its first tick past the threshold gives, whatever the slots
and queue length, and keeps its slots busy (ticks run = the schedule's length)."""

import heapq

import numpy as np
import pytest

from ctm_jax import serving
from ctm_jax import tasks
from ctm_jax.configs import image as image_configs
from ctm_jax.configs import parity as parity_configs
from early_exit_test import _brute_force
from early_exit_test import _full_run
from early_exit_test import _model


def _schedule_length(ticks_Q, slots: int) -> int:
  """Ticks until a queue is drained when each example takes the first free slot."""
  free = [0] * slots
  for ticks in ticks_Q:
    heapq.heappush(free, heapq.heappop(free) + int(ticks))
  return max(free)


def _thresholds_between(certainty_QxT, rng, count):
  """Thresholds midway between certainties seen (none within 1e-4), so that a
  different batching's last-bit differences cannot move a stopping tick."""
  values = np.unique(certainty_QxT)
  wide = np.flatnonzero(np.diff(values) > 2e-4)
  wide = wide[(wide > len(values) // 5) & (wide < len(values) * 19 // 20)]
  picks = rng.choice(wide, count, replace=False)
  return ((values[picks] + values[picks + 1]) / 2).astype(np.float32)


CONFIGS = {  # name -> (config, scale, head_scale, queue)
    'parity': (lambda: parity_configs.get_config('smoke'), 10.0, 10.0, 37),
    'image': (lambda: image_configs.get_config('smoke'), 1.0, 30.0, 13),
}


@pytest.mark.parametrize('name', ['parity', pytest.param('image', marks=pytest.mark.slow)])
def test_served_examples_equal_brute_force_and_slots_are_refilled(name):
  make, scale, head_scale, queue = CONFIGS[name]
  config = make()
  task = tasks.get(config.task)
  model, variables, _ = _model(config, scale, head_scale)
  inputs = task.model_inputs(task.synthetic_batch(config, queue, seed=3))
  rng = np.random.default_rng(0)
  spread = set()
  for max_ticks in (model.iterations, 2 * model.iterations):  # beyond the trained ticks too
    full = _full_run(model, variables, inputs, max_ticks)
    certainty_QxT = full[1][:, 1]
    thresholds = _thresholds_between(certainty_QxT, rng, 2)
    for slots in (1, 4, queue + 3):  # one at a time, refilled often, more slots than examples
      server = serving.Server(model, slots=slots, max_ticks=max_ticks)
      for threshold in [*thresholds, np.float32(1.01)]:
        got = server(variables, inputs, threshold)
        predictions, certainties, ticks_Q, stopped_Q = _brute_force(full, threshold, max_ticks)
        np.testing.assert_array_equal(got.ticks, ticks_Q)
        np.testing.assert_array_equal(got.stopped, stopped_Q)
        # Other batch shapes sum in another order; the scaled-up model amplifies
        # last-bit differences over ticks to ~1e-4.
        np.testing.assert_allclose(got.predictions, predictions, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(got.certainties, certainties, rtol=1e-3, atol=1e-3)
        # A finished example's slot is refilled at once: the slots run exactly
        # as many ticks as list scheduling of the examples' ticks needs.
        assert int(server.rounds) == _schedule_length(ticks_Q, slots)
        if threshold > 1:
          assert np.all(got.ticks == max_ticks)
        spread.add(tuple(np.asarray(got.ticks).tolist()))
  assert len(spread) > 3


def test_batched_baseline_equals_server():
  config = parity_configs.get_config('smoke')
  task = tasks.get(config.task)
  model, variables, _ = _model(config, 10.0, 10.0)
  inputs = task.model_inputs(task.synthetic_batch(config, 21, seed=5))
  certainty_QxT = _full_run(model, variables, inputs, model.iterations)[1][:, 1]
  (threshold,) = _thresholds_between(certainty_QxT, np.random.default_rng(1), 1)
  served = serving.Server(model, slots=8)(variables, inputs, threshold)
  batched = serving.batched(model, batch=8)(variables, inputs, threshold)
  np.testing.assert_array_equal(served.ticks, batched.ticks)
  np.testing.assert_allclose(served.predictions, batched.predictions, rtol=1e-5, atol=1e-5)


def test_bad_slots_are_named():
  model, _, _ = _model(parity_configs.get_config('smoke'))
  with pytest.raises(ValueError, match='slots=0'):
    serving.Server(model, slots=0)
