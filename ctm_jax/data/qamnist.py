"""Q&A-MNIST data (the reference's QAMNISTDataset and QAMNISTSampler).

An example shows `num_digits` handwritten digits, then asks a question about
them: an index (which digit to start from), then `num_operations` times an
operator ('+' or '-') and another index; the answer is the running value
modulo 10 after each operation. The reference's sampler draws the two counts
per batch with `np.random.randint(n - delta, n + delta)`, whose upper end is
exclusive: with delta > 0 the counts run from n - delta to n + delta - 1 (the
reference's script settings, 3 +- 2, give 1 to 4 digits and operations). We
draw them the same way, but per example: each example's padding ticks are
inactive in the model (ctm_jax/models/qamnist.py), so one compiled program
serves every mix of lengths, and the questions' distribution is the
reference's.

A record is a pure function of (split, seed, index), as in data/parity.py:
  digits          float32 (S, H, W, 1)  S = the most digits; unused slots zero
  question        int32 (Q,)            Q = 2 x the most operations + 1:
                                        index, operator (-1 '+', -2 '-'), index, ...
                                        unused positions 0
  num_digits      int32 ()
  num_operations  int32 ()
  targets         int32 ()              the answer, 0-9

Digit images: MNIST through `tfds.data_source` (the reference's
preprocessing: Resize(32) bilinear, /255, Normalize(0.1307, 0.3081)), or,
with no download, scikit-learn's 8x8 digits resized to 28x28 and
standardised with their train split's statistics.

Dimension glossary: N base images, S digit slots, Q question tokens, H = W pixels.
"""

import functools

import numpy as np
from PIL import Image

from ctm_jax.data import digits as digits_data
from ctm_jax.data import tfds_images

MODULO = 10
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_SIZE = 32  # the reference's Resize(32)
DIGITS_SIZE = 28
DATASETS = ('mnist', 'digits')
MNIST_SPEC = tfds_images.Spec(
    'mnist', 'train', 'test', 10, (28, 28, 1), (MNIST_MEAN,), (MNIST_STD,),
    tfds_images._BUILD.format(name='mnist', extra=''),  # pylint: disable=protected-access
)
_SPLIT_STREAMS = {'train': 0, 'eval': 1}
TRAIN_RECORDS = 2**31 - 1  # unbounded for all practical purposes
EVAL_RECORDS = 10_000


def count_range(n: int, delta: int) -> tuple[int, int]:
  """(lowest, highest) count the reference's sampler draws for `n` +- `delta`."""
  return (n, n) if delta == 0 else (n - delta, n + delta - 1)


def image_size(dataset: str) -> int:
  return MNIST_SIZE if dataset == 'mnist' else DIGITS_SIZE


def _resize(image_HxW_uint8: np.ndarray, size: int) -> np.ndarray:
  """PIL bilinear resize of a grey uint8 image, as torchvision's Resize on a PIL image."""
  return np.asarray(Image.fromarray(image_HxW_uint8, mode='L').resize((size, size), Image.BILINEAR))


class MnistImages:
  """MNIST digits of one split (tfds array_record), preprocessed as the reference does."""

  def __init__(self, split: str, data_dir: str):
    self.split = split
    tfds_split = MNIST_SPEC.train_split if split == 'train' else MNIST_SPEC.eval_split
    self._source = tfds_images.open_split('mnist', tfds_split, data_dir, MNIST_SPEC)

  def __len__(self) -> int:
    return len(self._source)

  def get(self, index: int) -> tuple[np.ndarray, int]:
    raw = self._source[int(index)]
    image = _resize(np.asarray(raw['image'], np.uint8)[..., 0], MNIST_SIZE).astype(np.float32) / 255.0
    return ((image - MNIST_MEAN) / MNIST_STD)[..., None].astype(np.float32), int(raw['label'])


@functools.lru_cache(maxsize=2)
def _resized_small_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits of one split at 28x28 in [0, 1], and their labels."""
  images_NxHxW, labels_N, train, test = digits_data._load()  # pylint: disable=protected-access
  rows = train if split == 'train' else test
  as_uint8 = np.round(images_NxHxW[rows] * 255).astype(np.uint8)
  images = np.stack([_resize(im, DIGITS_SIZE) for im in as_uint8]).astype(np.float32) / 255.0
  return images, labels_N[rows]


def _small_digit_stats() -> tuple[float, float]:
  """Mean and std of the resized train split: the standardisation of both splits."""
  train_images, _ = _resized_small_digits('train')
  return float(train_images.mean()), float(train_images.std())


def _small_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits of one split at 28x28, standardised by the train split."""
  images, labels = _resized_small_digits(split)
  mean, std = _small_digit_stats()
  return ((images - mean) / std)[..., None].astype(np.float32), labels


class SmallDigitImages:
  """scikit-learn's bundled digits (no download), one split, 28x28."""

  def __init__(self, split: str):
    self.split = split
    self.images_NxHxWx1, self.labels_N = _small_digits(split)

  def __len__(self) -> int:
    return len(self.labels_N)

  def get(self, index: int) -> tuple[np.ndarray, int]:
    return self.images_NxHxWx1[index], int(self.labels_N[index])


def read_digit(path: str, dataset: str) -> np.ndarray:
  """A user's picture of one digit (light ink on dark, as MNIST) as the
  model reads `dataset`'s digits: grey, resized, normalised; (H, W, 1)."""
  with Image.open(path) as image:
    grey = np.asarray(image.convert('L'))
  size = image_size(dataset)
  pixels = _resize(grey, size).astype(np.float32) / 255.0
  if dataset == 'mnist':
    return ((pixels - MNIST_MEAN) / MNIST_STD)[..., None].astype(np.float32)
  mean, std = _small_digit_stats()
  return ((pixels - mean) / std)[..., None].astype(np.float32)


def base_images(dataset: str, split: str, data_dir: str = ''):
  if dataset == 'mnist':
    return MnistImages(split, data_dir)
  if dataset == 'digits':
    return SmallDigitImages(split)
  raise ValueError(f'config.dataset={dataset!r}: Q&A-MNIST reads one of {", ".join(DATASETS)}')


def make_question(rng: np.random.Generator, labels_S, num_digits: int, num_operations: int, length: int):
  """The reference's question over the first `num_digits` digits (labels
  `labels_S`): (tokens (length,) int32 padded with 0, answer, readable text)."""
  tokens = np.zeros(length, np.int32)
  index = int(rng.integers(num_digits))
  tokens[0] = index
  value = int(labels_S[index]) % MODULO
  lines = []
  for k in range(num_operations):
    operator = int(rng.integers(2))  # 0 '+', 1 '-'
    index = int(rng.integers(num_digits))
    digit = int(labels_S[index])
    tokens[2 * k + 1], tokens[2 * k + 2] = -(operator + 1), index
    new = (value + digit) % MODULO if operator == 0 else (value - digit) % MODULO
    lines.append(f'({value} {"+-"[operator]} {digit}) mod {MODULO} = {new}')
    value = new
  return tokens, value, '\n'.join(lines)


class QAMNISTSource:
  """Random-access Q&A records (module docstring): grain's `RandomAccessDataSource`."""

  def __init__(self, images, *, num_images, num_images_delta, num_operations, num_operations_delta,
               seed: int, num_records: int, split: str = 'train'):
    if split not in _SPLIT_STREAMS:
      raise ValueError(f'split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}')
    self.images, self.seed, self.num_records, self.split = images, seed, num_records, split
    self.digit_range = count_range(num_images, num_images_delta)
    self.operation_range = count_range(num_operations, num_operations_delta)
    self.slots = self.digit_range[1]
    self.length = 2 * self.operation_range[1] + 1

  def __len__(self) -> int:
    return self.num_records

  def example(self, index: int) -> tuple[dict[str, np.ndarray], str]:
    """Record `index` and its question as text."""
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f'record {index} out of range [0, {self.num_records})')
    rng = np.random.default_rng([_SPLIT_STREAMS[self.split], self.seed, index])
    num_digits = int(rng.integers(self.digit_range[0], self.digit_range[1] + 1))
    num_operations = int(rng.integers(self.operation_range[0], self.operation_range[1] + 1))
    picks = rng.integers(len(self.images), size=num_digits)
    first, _ = self.images.get(picks[0])
    digits = np.zeros((self.slots, *first.shape), np.float32)
    labels = np.zeros(num_digits, np.int32)
    for slot, pick in enumerate(picks):
      digits[slot], labels[slot] = self.images.get(pick)
    question, answer, text = make_question(rng, labels, num_digits, num_operations, self.length)
    record = {
        'digits': digits,
        'question': question,
        'num_digits': np.int32(num_digits),
        'num_operations': np.int32(num_operations),
        'targets': np.int32(answer),
    }
    return record, text

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self.example(index)[0]

  def __repr__(self) -> str:
    return (
        f'QAMNISTSource(digits {self.digit_range}, operations {self.operation_range}, '
        f'seed={self.seed}, num_records={self.num_records}, split={self.split!r})'
    )


def source(config, split: str) -> QAMNISTSource:
  images = base_images(config.dataset, 'train' if split == 'train' else 'eval', config.get('data_dir', ''))
  return QAMNISTSource(
      images,
      num_images=config.q_num_images,
      num_images_delta=config.q_num_images_delta,
      num_operations=config.q_num_operations,
      num_operations_delta=config.q_num_operations_delta,
      seed=config.seed,
      num_records=TRAIN_RECORDS if split == 'train' else EVAL_RECORDS,
      split=split,
  )
