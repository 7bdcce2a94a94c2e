"""Bracket sequences, valid or near misses: the community's brackets task.

A record is a sequence over `(`, `)`, `[`, `]` and whether it is well nested
(every bracket closed by its own kind, innermost first): 1 valid, 0 not.
Records alternate valid (even index) and invalid (odd index), so every split
is 50/50. A valid sequence has an even length drawn uniformly from the
split's range; it is built left to right by a random walk over the nesting
depth (open a random kind with probability 1/2 while the remaining length
allows, else close the innermost open bracket). An invalid one is a near
miss of a valid one, made by one of four edits drawn uniformly (so the kinds
are balanced): two brackets swapped, one deleted, one inserted, or one
mistyped (its kind changed, its direction kept). An edit that happens to
leave a valid sequence is drawn again. Deletions and insertions give odd
lengths: a model can tell those from length parity alone; swaps and
mistypes keep the length even and need the nesting read.

Sequences are padded at the end with PAD to the split's width. A record is a
pure function of (split, seed, index), like every synthetic source here.

Dimension glossary: W padded width, V vocabulary (PAD and the four brackets).
"""

import numpy as np

PAD, OPEN_ROUND, CLOSE_ROUND, OPEN_SQUARE, CLOSE_SQUARE = range(5)
VOCAB = 5
SYMBOLS = '.()[]'  # by token id; '.' shows padding
_OPENS = (OPEN_ROUND, OPEN_SQUARE)
_CLOSER = {OPEN_ROUND: CLOSE_ROUND, OPEN_SQUARE: CLOSE_SQUARE}
_MISTYPED = {OPEN_ROUND: OPEN_SQUARE, OPEN_SQUARE: OPEN_ROUND, CLOSE_ROUND: CLOSE_SQUARE,
             CLOSE_SQUARE: CLOSE_ROUND}
EDITS = ('swap', 'delete', 'insert', 'mistype')
# What a record is, for accuracy per kind: valid, one of the near misses, or
# a sequence given from elsewhere (its edit unknown).
KINDS = ('valid',) + EDITS + ('unknown',)

# Stream tags mixed into every record's seed; splits never share a key.
_SPLIT_STREAMS = {'train': 0, 'eval': 1, 'long': 2}
TRAIN_RECORDS = 2**31 - 1
EVAL_RECORDS = 10_000


def is_valid(tokens) -> bool:
  """The stack checker: whether `tokens` (ids, PAD ignored) are well nested."""
  stack = []
  for token in tokens:
    token = int(token)
    if token == PAD:
      continue
    if token in _OPENS:
      stack.append(token)
    elif not stack or _CLOSER[stack.pop()] != token:
      return False
  return not stack


def to_text(tokens) -> str:
  return ''.join(SYMBOLS[int(t)] for t in tokens if int(t) != PAD)


def from_text(text: str) -> np.ndarray:
  """Token ids of a string of brackets; ValueError naming the first other character."""
  for i, char in enumerate(text):
    if char not in SYMBOLS[1:]:
      raise ValueError(f'{char!r} at position {i} is not a bracket; use only ( ) [ ]')
  return np.array([SYMBOLS.index(c) for c in text], np.int32)


def random_valid(rng: np.random.Generator, length: int) -> np.ndarray:
  """A well-nested sequence of even `length`."""
  tokens, stack = [], []
  for position in range(length):
    remaining = length - position
    if stack and (len(stack) == remaining or rng.random() < 0.5):
      tokens.append(_CLOSER[stack.pop()])
    else:
      opened = _OPENS[rng.integers(2)]
      stack.append(opened)
      tokens.append(opened)
  return np.array(tokens, np.int32)


def _edit(rng: np.random.Generator, tokens: np.ndarray, edit: str) -> np.ndarray:
  n = len(tokens)
  if edit == 'swap':
    i, j = rng.choice(n, 2, replace=False)
    out = tokens.copy()
    out[i], out[j] = tokens[j], tokens[i]
    return out
  if edit == 'delete':
    return np.delete(tokens, rng.integers(n))
  if edit == 'insert':
    return np.insert(tokens, rng.integers(n + 1), rng.integers(1, VOCAB))
  out = tokens.copy()
  i = rng.integers(n)
  out[i] = _MISTYPED[int(tokens[i])]
  return out


def near_miss(rng: np.random.Generator, min_length: int, max_length: int, edit: str) -> np.ndarray:
  """An invalid sequence of length in [min_length, max_length]: a valid one
  with one `edit` (EDITS), drawn again until it is no longer valid."""
  # The valid sequence's length, so that the edited one fits the range.
  low = min_length + (1 if edit == 'delete' else 0)
  high = max_length - (1 if edit == 'insert' else 0)
  evens = np.arange(low + low % 2, high + 1, 2)
  evens = evens[evens >= 2]
  if not len(evens):
    raise ValueError(f'no valid sequence in [{low}, {high}] to {edit}')
  while True:
    tokens = _edit(rng, random_valid(rng, int(rng.choice(evens))), edit)
    if not is_valid(tokens):
      return tokens


class BracketsSource:
  """Random-access bracket records: grain's `RandomAccessDataSource` protocol.

  Record `index` is {'tokens': int32 (W,) token ids (PAD after the
  sequence), 'inputs': float32 (W, VOCAB) the same one-hot (what the model
  reads), 'targets': int32 () 1 valid / 0 invalid, 'length': int32 (),
  'kind': int32 () index into KINDS (valid or which near miss)}.
  """

  def __init__(self, min_length: int, max_length: int, width: int, seed: int, num_records: int,
               split: str = 'train'):
    check_lengths(min_length, max_length, width)
    if split not in _SPLIT_STREAMS:
      raise ValueError(f'split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}')
    self.min_length, self.max_length, self.width = min_length, max_length, width
    self.seed, self.num_records, self.split = seed, num_records, split

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f'record {index} out of range [0, {self.num_records})')
    rng = np.random.default_rng([_SPLIT_STREAMS[self.split], self.seed, index])
    valid = index % 2 == 0
    if valid:
      low = self.min_length + self.min_length % 2
      tokens = random_valid(rng, int(rng.choice(np.arange(max(low, 2), self.max_length + 1, 2))))
      return record(tokens, self.width, True)
    edit = EDITS[rng.integers(len(EDITS))]
    return record(near_miss(rng, self.min_length, self.max_length, edit), self.width, False, edit)

  def __repr__(self) -> str:
    return (f'BracketsSource(lengths=[{self.min_length}, {self.max_length}], width={self.width}, '
            f'seed={self.seed}, num_records={self.num_records}, split={self.split!r})')


def record(tokens, width: int, valid: bool | None = None, edit: str | None = None) -> dict[str, np.ndarray]:
  """A record of `tokens` padded to `width`; its target from the stack
  checker unless given; its `edit` (KINDS: 'valid', an EDITS near miss, or
  'unknown' for a sequence from elsewhere) as an index into KINDS."""
  tokens_W = np.full(width, PAD, np.int32)
  tokens_W[: len(tokens)] = tokens
  valid = is_valid(tokens) if valid is None else valid
  return {
      'tokens': tokens_W,
      'inputs': np.eye(VOCAB, dtype=np.float32)[tokens_W],
      'targets': np.int32(valid),
      'length': np.int32(len(tokens)),
      'kind': np.int32(KINDS.index(edit or ('valid' if valid else 'unknown'))),
  }


def check_lengths(min_length: int, max_length: int, width: int) -> None:
  """ValueError unless 1 <= min_length, a valid sequence fits (an even
  length in range, so max_length >= 2), and max_length <= width."""
  if not 1 <= min_length <= max_length or max_length < 2:
    raise ValueError(f'lengths [{min_length}, {max_length}]: need 1 <= min <= max and max >= 2')
  if max_length - min_length < 1 and min_length % 2:
    raise ValueError(f'lengths [{min_length}, {max_length}]: hold no even length for a valid sequence')
  if max_length > width:
    raise ValueError(f'max length {max_length} is over the padded width {width}')


def train_source(config) -> BracketsSource:
  return BracketsSource(config.brackets_min_length, config.brackets_max_length, width(config),
                        config.seed, TRAIN_RECORDS, 'train')


def eval_source(config, num_records: int = EVAL_RECORDS) -> BracketsSource:
  return BracketsSource(config.brackets_min_length, config.brackets_max_length, width(config),
                        config.seed, num_records, 'eval')


def long_source(config, num_records: int = EVAL_RECORDS) -> BracketsSource:
  """Length generalisation: sequences longer than any trained on, up to the width."""
  return BracketsSource(config.brackets_max_length + 1, width(config), width(config), config.seed,
                        num_records, 'long')


def width(config) -> int:
  """The padded width every sequence is given: the longest of the long split."""
  return int(config.brackets_long_max_length)
