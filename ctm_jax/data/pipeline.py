"""Input pipelines shared by every task: shuffled, host-sharded, checkpointable.

Built on grain's dataset API (`MapDataset` -> `IterDataset`), the API grain
recommends over the older `DataLoader` + `IndexSampler`: transformations are
index-based and lazy, so a practically unbounded synthetic source is shuffled
and sharded without ever being listed, and the iterator's state is a small
dict (positions, not buffers) that orbax saves beside the train state.

Order of a train pipeline, per host:
  source -> global shuffle (reshuffled each epoch) -> drop the epoch's remainder
  -> repeat -> random transform (augmentation) -> every shard_count-th record
  from shard_index -> batch -> workers.
Sharding a globally shuffled order by stride means the hosts' batches of step s
together hold exactly the records of step s of the same pipeline run unsharded
with the global batch size, so the data seen per step does not depend on how
many hosts share it. The transform's random stream is keyed by the record's
global position, so the augmentation does not depend on it either. Every shard
has the same length, so no host runs out first. The transform runs where the
records are read (reader threads or worker processes), off the accelerator.

Dimension glossary: B per-host batch.
"""

import os
import threading
import time
from typing import Any, Callable, Sequence

import grain
import numpy as np

# Name of the iterator's item in the trainer's orbax CheckpointManager.
DATA_ITEM = 'data'


def _check_batching(batch_size: int, shard_index: int, shard_count: int):
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} not in [0, shard_count={shard_count})')


def train_batches_per_epoch(num_records: int, batch_size: int, shard_count: int) -> int:
  """Full per-shard train batches of `batch_size` an epoch of `num_records` gives."""
  return num_records // shard_count // batch_size


def eval_batches_available(num_records: int, batch_size: int, shard_count: int) -> int:
  """Full held-out batches of `batch_size` per shard that `num_records` hold."""
  return num_records // (batch_size * shard_count)


def make_train_loader(
    source: Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    worker_count: int = 0,
    num_epochs: int | None = None,
    read_options: grain.ReadOptions | None = None,
    transform: Callable[[Any, np.random.Generator], Any] | None = None,
) -> grain.IterDataset:
  """A host's train batches; `iter()` of it is checkpointable (get_state/set_state).

  Args:
    source: random-access records (`__len__`, `__getitem__`), picklable when
      `worker_count > 0`.
    batch_size: per-host batch size B; a short final batch is dropped.
    seed: shuffle seed in [0, 2**32); epoch e uses seed + e.
    shard_index, shard_count: this host's shard, usually
      (jax.process_index(), jax.process_count()).
    worker_count: processes that read and batch; 0 reads in this process.
      The batch order depends on it, so a resumed run must keep it.
    num_epochs: passes over the source; None repeats forever.
    read_options: grain's per-process reader threads and buffer.
    transform: (record, rng) -> record, e.g. augmentation; `rng` is a function
      of `seed` and the record's global position in the stream. Picklable when
      `worker_count > 0`.

  Returns:
    An `IterDataset` of batches: each leaf of a record stacked to (B, ...).
  """
  _check_batching(batch_size, shard_index, shard_count)
  if worker_count < 0:
    raise ValueError(f'worker_count must be non-negative, got {worker_count}')
  records_per_epoch = len(source) // shard_count * shard_count
  if train_batches_per_epoch(len(source), batch_size, shard_count) < 1:
    raise ValueError(
        f'{len(source)} records over {shard_count} shards leave fewer than one batch of '
        f'{batch_size} per shard'
    )
  ds = grain.MapDataset.source(source).shuffle(seed=seed)
  # Repeating a shuffled MapDataset reshuffles every epoch.
  if records_per_epoch != len(source):
    ds = ds[:records_per_epoch]
  ds = ds.repeat(num_epochs)
  if transform is not None:
    ds = ds.random_map(transform, seed=seed)
  ds = ds[shard_index::shard_count]
  iter_ds = ds.to_iter_dataset(read_options).batch(batch_size, drop_remainder=True)
  if worker_count > 0:
    # Batch inside the workers: one transfer per batch rather than per record.
    iter_ds = iter_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count), worker_init_fn=_die_with_parent
    )
  return iter_ds


def _watch_parent(parent: int):
  while os.getppid() == parent:
    time.sleep(1.0)
  os._exit(1)  # pylint: disable=protected-access  # the trainer is gone, SIGKILL included


def _die_with_parent(worker_index: int, worker_count: int):
  """Runs in each grain worker: ends it within a second of its trainer's death.

  A killed trainer cannot stop its workers, and they are re-parented, not
  signalled; polling the parent pid works for any cause of death.
  """
  del worker_index, worker_count
  parent = os.getppid()
  if parent == 1:
    os._exit(1)  # pylint: disable=protected-access
  threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def make_eval_batches(
    source: Sequence[Any],
    *,
    batch_size: int,
    num_batches: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    read_options: grain.ReadOptions | None = None,
) -> list[Any]:
  """The held-out batches of one host: the same list on every call, unshuffled.

  Records are dealt to hosts by stride as in training: host i's batch j holds
  records (j * batch_size + k) * shard_count + i, k < batch_size. `num_batches`
  None takes every full batch the source holds. `read_options` sets the reader
  threads.
  """
  _check_batching(batch_size, shard_index, shard_count)
  available = eval_batches_available(len(source), batch_size, shard_count)
  if num_batches is None:
    num_batches = available
  if not 0 < num_batches <= available:
    raise ValueError(
        f'{num_batches} batches of {batch_size} on {shard_count} shards need '
        f'{num_batches * batch_size * shard_count} records; the source has {len(source)}'
    )
  records = grain.MapDataset.source(source)[shard_index::shard_count]
  ds = records[: num_batches * batch_size].batch(batch_size)
  # Reader threads decode and crop in parallel (ImageNet's eval set takes
  # minutes serially); the order is kept.
  return list(ds.to_iter_dataset(read_options))


def save_args(iterator: grain.DatasetIterator) -> Any:
  """Orbax args saving `iterator`'s position as the 'data' item (one file per process)."""
  return grain.checkpoint.CheckpointSave(iterator)


def restore_args(iterator: grain.DatasetIterator) -> Any:
  """Orbax args restoring the 'data' item into `iterator` (a fresh one of the same loader)."""
  return grain.checkpoint.CheckpointRestore(iterator)


def item_handlers() -> dict[str, Any]:
  """Handlers to pass to `CheckpointManager(item_handlers=...)` next to the state's."""
  return {DATA_ITEM: grain.checkpoint.CheckpointHandler()}
