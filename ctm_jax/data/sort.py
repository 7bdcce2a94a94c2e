"""Synthetic sorting data, as in the reference's `SortDataset`.

A record is N numbers drawn from a standard normal and, as its target, the
permutation that sorts them (`argsort`: the index of the smallest first).
As in data/parity.py, a record is a pure function of (split, seed, index):
any host or worker reads any record without coordination, resumed runs see
the same data, and the eval split never shares a key with the train split.

Dimension glossary: N numbers to sort.
"""

import numpy as np

_SPLIT_STREAMS = {'train': 0, 'eval': 1}
TRAIN_RECORDS = 2**31 - 1  # unbounded for all practical purposes; fits grain's shuffle
EVAL_RECORDS = 10_000


class SortSource:
  """Random-access records {'inputs': float32 (N,), 'targets': int32 (N,)}:
  grain's `RandomAccessDataSource` protocol."""

  def __init__(self, size: int, seed: int, num_records: int, split: str = 'train'):
    if size <= 0:
      raise ValueError(f'size must be positive, got {size}')
    if split not in _SPLIT_STREAMS:
      raise ValueError(f'split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}')
    self.size, self.seed, self.num_records, self.split = size, seed, num_records, split

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f'record {index} out of range [0, {self.num_records})')
    rng = np.random.default_rng([_SPLIT_STREAMS[self.split], self.seed, index])
    inputs_N = rng.standard_normal(self.size).astype(np.float32)
    return {'inputs': inputs_N, 'targets': np.argsort(inputs_N, kind='stable').astype(np.int32)}

  def __repr__(self) -> str:
    return f'SortSource(size={self.size}, seed={self.seed}, num_records={self.num_records}, split={self.split!r})'


def train_source(size: int, seed: int) -> SortSource:
  return SortSource(size, seed, TRAIN_RECORDS, 'train')


def eval_source(size: int, seed: int) -> SortSource:
  return SortSource(size, seed, EVAL_RECORDS, 'eval')
