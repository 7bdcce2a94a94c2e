"""Continuous batching (`serving.Slots`): examples that join at any tick, each
with its own threshold and tick limit, get what running every tick and
picking their first tick past the threshold gives; every example is answered
exactly once; a free slot takes the next example at once."""

import collections

import jax
import numpy as np

from ctm_jax import serving
from ctm_jax import tasks
from ctm_jax.configs import parity as parity_configs
from early_exit_test import _full_run
from early_exit_test import _model
from serving_test import _thresholds_between


def _drive(slots, inputs_QxI, threshold_Q, limit_Q, arrivals_Q):
  """A host loop as a server runs one: example q may join from round
  arrivals_Q[q] on; returns {q: history} and the rounds each waited."""
  width = slots.slots
  carry = slots.empty(inputs_QxI[:width])
  owner = [-1] * width
  pending = collections.deque()
  answered, waited = {}, {}
  arrived = 0
  clock = 0
  while len(answered) < len(inputs_QxI):
    while arrived < len(inputs_QxI) and arrivals_Q[arrived] <= clock:
      pending.append(arrived)
      arrived += 1
    taken = []  # (slot, example)
    for s in range(width):
      if owner[s] < 0 and pending:
        q = pending.popleft()
        owner[s] = q
        taken.append((s, q))
        waited[q] = clock - arrivals_Q[q]
    if taken:
      slots_K, queue_K = (np.asarray(a) for a in zip(*taken))
      carry = slots.admit(carry, inputs_QxI[queue_K], slots_K, threshold_Q[queue_K], limit_Q[queue_K])
    if not any(o >= 0 for o in owner):
      clock = arrivals_Q[arrived]  # idle until the next arrival
      continue
    carry, done_S = slots.run(carry, 3)
    clock += 1
    done = np.flatnonzero(np.asarray(done_S))
    for s, history in zip(done, slots.history(carry, done.tolist())):
      assert owner[s] not in answered, 'answered twice'
      answered[owner[s]] = history
      owner[s] = -1
  return answered, waited


def test_examples_joining_at_any_tick_with_their_own_thresholds_get_the_full_runs_ticks():
  config = parity_configs.get_config('smoke')
  task = tasks.get(config.task)
  model, variables, _ = _model(config, 10.0, 10.0)
  queue = 29
  inputs = np.asarray(task.model_inputs(task.synthetic_batch(config, queue, seed=4)))
  max_ticks = 2 * model.iterations  # beyond the trained ticks too
  predictions_QxOxT, certainties_Qx2xT = _full_run(model, variables, inputs, max_ticks)
  certainty_QxT = certainties_Qx2xT[:, 1]
  rng = np.random.default_rng(0)
  choices = [*_thresholds_between(certainty_QxT, rng, 3), np.float32(1.5)]  # 1.5: every tick
  threshold_Q = np.asarray(rng.choice(choices, queue), np.float32)
  limit_Q = rng.integers(1, max_ticks + 1, queue).astype(np.int32)
  arrivals_Q = np.sort(rng.integers(0, 12, queue))
  slots = serving.Slots(model, variables, slots=4, max_ticks=max_ticks, trace=True)
  answered, waited = _drive(slots, inputs, threshold_Q, limit_Q, arrivals_Q)

  assert sorted(answered) == list(range(queue))
  ticks_seen = set()
  for q, history in answered.items():
    sure_T = certainty_QxT[q, : limit_Q[q]] >= threshold_Q[q]
    ticks = int(np.argmax(sure_T)) + 1 if sure_T.any() else int(limit_Q[q])
    assert history['ticks'] == ticks, q
    assert history['sure'] == bool(sure_T.any())
    np.testing.assert_allclose(history['predictions_TxO'], predictions_QxOxT[q, :, :ticks].T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(history['certainty_T'], certainty_QxT[q, :ticks], rtol=1e-4, atol=1e-4)
    assert history['attention_TxKxN'].shape == (ticks, model.heads, inputs.shape[1])
    np.testing.assert_allclose(history['attention_TxKxN'].sum(-1), 1.0, rtol=1e-5)
    ticks_seen.add(ticks)
  assert len(ticks_seen) > 3
  assert max(waited.values()) > 0  # the slots were full at times: examples queued


def test_the_attention_equals_the_tracked_runs():
  config = parity_configs.get_config('smoke')
  task = tasks.get(config.task)
  model, variables, _ = _model(config, 10.0, 10.0)
  inputs = np.asarray(task.model_inputs(task.synthetic_batch(config, 3, seed=2)))
  tracked = jax.jit(lambda v, x: model.apply(v, x, track=True))(variables, inputs)
  attention_QxTxKxN = np.moveaxis(np.asarray(tracked.tracking.attention, np.float32)[:, :, :, 0], 0, 1)
  slots = serving.Slots(model, variables, slots=3, trace=True)
  carry = slots.admit(slots.empty(inputs), inputs, [0, 1, 2], np.full(3, 2.0, np.float32), np.full(3, model.iterations, np.int32))
  carry, done_S = slots.run(carry, 10_000)
  assert np.asarray(done_S).all()
  for q, history in enumerate(slots.history(carry, [0, 1, 2])):
    np.testing.assert_allclose(history['attention_TxKxN'], attention_QxTxKxN[q], rtol=1e-4, atol=1e-5)
