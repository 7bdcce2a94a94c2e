"""Tests of the parity source and the shared grain pipeline (ctm_jax/data).

Dimension glossary: B batch, L parity sequence length.
"""

import pickle

from absl import flags
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ctm_jax import data
from ctm_jax.data import parity

# grain's worker processes read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()


class _IndexSource:
  """Record i is {'index': i}: makes sharding and shuffling visible."""

  def __init__(self, num_records):
    self.num_records = num_records

  def __len__(self):
    return self.num_records

  def __getitem__(self, index):
    return {'index': np.int64(index)}


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _indices(batches):
  return [int(i) for b in batches for i in b['index']]


def _assert_batches_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


# Parity source.


def test_targets_are_cumulative_parity_of_pm1_inputs():
  src = parity.train_source(length=64, seed=3)
  for index in [0, 1, 7, 12345, len(src) - 1]:
    record = src[index]
    inputs_L, targets_L = record['inputs'], record['targets']
    assert inputs_L.shape == targets_L.shape == (64,)
    assert inputs_L.dtype == np.float32 and targets_L.dtype == np.int32
    assert set(np.unique(inputs_L)) <= {-1.0, 1.0}
    negatives = 0
    for i, x in enumerate(inputs_L):
      negatives += x == -1
      assert targets_L[i] == negatives % 2, (index, i)


def test_inputs_are_uniform_pm1():
  src = parity.train_source(length=64, seed=0)
  inputs = np.stack([src[i]['inputs'] for i in range(500)])
  # 32000 fair coin flips: the share of -1 is 0.5 +- 0.003 (1 sigma).
  assert abs(np.mean(inputs == -1) - 0.5) < 0.015


def test_records_are_pure_functions_of_seed_and_index():
  a = parity.ParitySource(length=32, seed=5, num_records=100)
  b = pickle.loads(pickle.dumps(parity.ParitySource(length=32, seed=5, num_records=100)))
  _assert_batches_equal([a[i] for i in [9, 0, 42]], [b[i] for i in [9, 0, 42]])
  # Reading order does not matter.
  assert np.array_equal(a[42]['inputs'], a[42]['inputs'])
  assert not np.array_equal(a[0]['inputs'], a[1]['inputs'])
  other_seed = parity.ParitySource(length=32, seed=6, num_records=100)
  assert not np.array_equal(a[0]['inputs'], other_seed[0]['inputs'])
  with pytest.raises(IndexError):
    a[100]


def test_train_and_eval_streams_differ():
  train = parity.train_source(length=64, seed=0)
  held_out = parity.eval_source(length=64, seed=0)
  assert len(held_out) == parity.EVAL_RECORDS
  train_rows = {train[i]['inputs'].tobytes() for i in range(300)}
  eval_rows = {held_out[i]['inputs'].tobytes() for i in range(300)}
  assert len(train_rows) == len(eval_rows) == 300
  assert not train_rows & eval_rows


# Train loader.


def test_loader_batches_have_shape_and_dtype():
  src = parity.train_source(length=16, seed=0)
  batch = next(iter(data.make_train_loader(src, batch_size=8, seed=0)))
  assert batch['inputs'].shape == batch['targets'].shape == (8, 16)
  assert batch['inputs'].dtype == np.float32 and batch['targets'].dtype == np.int32
  np.testing.assert_array_equal(batch['targets'], parity.parity_targets(batch['inputs']))


def test_same_seed_same_batches_other_seed_other_batches():
  src = parity.train_source(length=16, seed=0)
  make = lambda seed: _take(iter(data.make_train_loader(src, batch_size=8, seed=seed)), 4)
  _assert_batches_equal(make(1), make(1))
  assert not np.array_equal(make(1)[0]['inputs'], make(2)[0]['inputs'])


def test_each_epoch_is_a_fresh_permutation():
  src = _IndexSource(24)
  loader = data.make_train_loader(src, batch_size=4, seed=0, num_epochs=2)
  order = _indices(list(loader))
  assert len(order) == 48
  epoch0, epoch1 = order[:24], order[24:]
  assert sorted(epoch0) == sorted(epoch1) == list(range(24))
  assert epoch0 != list(range(24)) and epoch0 != epoch1


def test_shards_partition_the_unsharded_stream():
  src = _IndexSource(40)
  batch_size, steps = 4, 25  # 2.5 epochs of the 20 records each shard holds
  whole = _take(iter(data.make_train_loader(src, batch_size=2 * batch_size, seed=7)), steps)
  shards = [
      _take(
          iter(
              data.make_train_loader(
                  src, batch_size=batch_size, seed=7, shard_index=i, shard_count=2
              )
          ),
          steps,
      )
      for i in range(2)
  ]
  for step in range(steps):
    # The hosts' batches of a step together are the unsharded global batch.
    per_host = [_indices([shard[step]]) for shard in shards]
    assert not set(per_host[0]) & set(per_host[1])
    assert sorted(per_host[0] + per_host[1]) == sorted(_indices([whole[step]]))
  for shard in shards:
    epoch = _indices(shard[:5])  # 5 batches of 4: one pass over the shard
    assert len(set(epoch)) == 20
  assert not set(_indices(shards[0][:5])) & set(_indices(shards[1][:5]))


def test_shards_drop_the_remainder_and_stay_equal():
  src = _IndexSource(23)  # 11 records per shard, 1 dropped per epoch
  shards = [
      _indices(
          data.make_train_loader(
              src, batch_size=3, seed=0, shard_index=i, shard_count=2, num_epochs=1
          )
      )
      for i in range(2)
  ]
  assert len(shards[0]) == len(shards[1]) == 9  # 3 full batches of the 11
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) <= set(range(23))


def test_bad_arguments_raise():
  src = _IndexSource(10)
  with pytest.raises(ValueError, match='shard_index'):
    data.make_train_loader(src, batch_size=2, seed=0, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match='fewer than one batch'):
    data.make_train_loader(src, batch_size=6, seed=0, shard_count=2)


# Iterator state through orbax.


def _round_trip(tmp_path, worker_count, k=3, m=4):
  src = parity.train_source(length=16, seed=0)
  make = lambda: data.make_train_loader(src, batch_size=8, seed=1, worker_count=worker_count)
  state = {'w': np.arange(6, dtype=np.float32)}
  directory = (tmp_path / 'ckpt').absolute()  # orbax wants an absolute path
  iterator = iter(make())
  _take(iterator, k)
  with ocp.CheckpointManager(directory) as manager:
    manager.save(
        k,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=data.save_args(iterator)),
    )
    manager.wait_until_finished()
  want = _take(iterator, m)
  if worker_count:
    iterator.close()

  fresh = iter(make())
  with ocp.CheckpointManager(directory) as manager:
    assert manager.latest_step() == k
    restored = manager.restore(
        k,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state), data=data.restore_args(fresh)
        ),
    )
  np.testing.assert_array_equal(restored['state']['w'], state['w'])
  assert restored[data.DATA_ITEM] is fresh
  got = _take(fresh, m)
  if worker_count:
    fresh.close()
  _assert_batches_equal(got, want)
  # The restored position is k batches in, not the start.
  first = _take(iter(make()), 1)[0]
  assert not np.array_equal(got[0]['inputs'], first['inputs'])


def test_iterator_state_round_trip_through_checkpoint_manager(tmp_path):
  _round_trip(tmp_path, worker_count=0)


def test_iterator_state_round_trip_with_workers(tmp_path):
  _round_trip(tmp_path, worker_count=2)


def test_data_item_alone_with_explicit_handlers(tmp_path):
  src = _IndexSource(50)
  make = lambda: iter(data.make_train_loader(src, batch_size=5, seed=2))
  iterator = make()
  _take(iterator, 2)
  directory = (tmp_path / 'ckpt').absolute()
  with ocp.CheckpointManager(directory, item_handlers=data.item_handlers()) as manager:
    manager.save(2, args=ocp.args.Composite(data=data.save_args(iterator)))
    manager.wait_until_finished()
  fresh = make()
  with ocp.CheckpointManager(directory, item_handlers=data.item_handlers()) as manager:
    manager.restore(2, args=ocp.args.Composite(data=data.restore_args(fresh)))
  assert _indices(_take(fresh, 3)) == _indices(_take(iterator, 3))


# Eval batches.


def test_eval_batches_are_fixed():
  src = parity.eval_source(length=16, seed=0, num_records=100)
  first = data.make_eval_batches(src, batch_size=16, num_batches=3)
  again = data.make_eval_batches(src, batch_size=16, num_batches=3)
  _assert_batches_equal(first, again)
  assert len(first) == 3
  assert first[0]['inputs'].shape == (16, 16) and first[0]['targets'].dtype == np.int32
  np.testing.assert_array_equal(first[1]['inputs'][0], src[16]['inputs'])
  assert len(data.make_eval_batches(src, batch_size=16)) == 6  # every full batch
  with pytest.raises(ValueError, match='records'):
    data.make_eval_batches(src, batch_size=16, num_batches=7)
  threaded = data.make_eval_batches(
      src, batch_size=16, num_batches=3, read_options=grain.ReadOptions(num_threads=4)
  )
  _assert_batches_equal(first, threaded)  # reader threads keep the order


def test_eval_shards_are_disjoint_and_cover_the_global_batches():
  src = _IndexSource(30)
  shards = [
      data.make_eval_batches(src, batch_size=3, num_batches=5, shard_index=i, shard_count=2)
      for i in range(2)
  ]
  for j in range(5):
    assert sorted(_indices([shards[0][j]]) + _indices([shards[1][j]])) == list(
        range(6 * j, 6 * j + 6)
    )
