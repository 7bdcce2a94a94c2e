"""Synthetic cumulative-parity data, as in the reference's `ParityDataset`.

A record is a sequence x of L values drawn uniformly from {-1, +1} and its
cumulative parity: target[i] = (number of -1 in x[:i+1]) mod 2. The reference
draws a fresh sequence from the global torch RNG on every access (the index is
ignored), so its train and test sets are the same distribution with no fixed
records. Here a record is a pure function of (split, seed, index), so any host
or worker reads any record without coordination, resumed runs see the same
data, and the eval split is disjoint from the train split by construction (a
different seed stream, not a different slice of one stream).

Dimension glossary: L parity sequence length.
"""

import numpy as np

# Stream tags mixed into every record's seed; train and eval never share a key.
_SPLIT_STREAMS = {'train': 0, 'eval': 1}

# Records of a train source: an unbounded stream for all practical purposes,
# never materialised. It fits the 32-bit index shuffle that grain applies.
TRAIN_RECORDS = 2**31 - 1

# Held-out size of the reference's test set (`ParityDataset(length=10000)`).
EVAL_RECORDS = 10_000


def parity_targets(inputs_L: np.ndarray) -> np.ndarray:
  """Cumulative parity of a +-1 sequence (or a batch of them, last axis): int32."""
  return (np.cumsum(inputs_L == -1, axis=-1) % 2).astype(np.int32)


class ParitySource:
  """Random-access parity records: grain's `RandomAccessDataSource` protocol.

  Record `index` is {'inputs': float32 (L,), 'targets': int32 (L,)}, drawn
  from a NumPy generator seeded by (split stream, seed, index).
  """

  def __init__(self, length: int, seed: int, num_records: int, split: str = 'train'):
    if length <= 0:
      raise ValueError(f'length must be positive, got {length}')
    if num_records <= 0:
      raise ValueError(f'num_records must be positive, got {num_records}')
    if seed < 0:
      raise ValueError(f'seed must be non-negative, got {seed}')
    if split not in _SPLIT_STREAMS:
      raise ValueError(f'split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}')
    self.length = length
    self.seed = seed
    self.num_records = num_records
    self.split = split

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f'record {index} out of range [0, {self.num_records})')
    # SeedSequence hashes the whole key, so neighbouring indices and seeds give
    # independent streams.
    rng = np.random.default_rng([_SPLIT_STREAMS[self.split], self.seed, index])
    inputs_L = (2 * rng.integers(0, 2, size=self.length) - 1).astype(np.float32)
    return {'inputs': inputs_L, 'targets': parity_targets(inputs_L)}

  def __repr__(self) -> str:
    return (
        f'ParitySource(length={self.length}, seed={self.seed}, '
        f'num_records={self.num_records}, split={self.split!r})'
    )


def train_source(length: int, seed: int, num_records: int = TRAIN_RECORDS) -> ParitySource:
  """The train stream: practically unbounded; shuffle and shard it with the pipeline."""
  return ParitySource(length, seed, num_records, split='train')


def eval_source(length: int, seed: int, num_records: int = EVAL_RECORDS) -> ParitySource:
  """The held-out stream: a fixed set, disjoint from every train source's keys."""
  return ParitySource(length, seed, num_records, split='eval')
