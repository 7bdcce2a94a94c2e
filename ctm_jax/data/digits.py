"""scikit-learn's bundled 8x8 handwritten digits: real images with no download.

1797 grey images of the digits 0-9 (UCI optdigits test set) ship inside the
scikit-learn wheel. A fixed stratified split keeps TEST_RECORDS of them for
evaluation; pixels (0-16) are scaled to [0, 1] and standardised with the train
split's mean and std, as torchvision's Normalize does for CIFAR.

Dimension glossary: N records, H = W = 8 pixels, C = 1 channel.
"""

import functools

import numpy as np

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
TEST_RECORDS = 360  # 20%, a multiple of common batch sizes (8, 12, 24, 40, 72, 120)
SPLIT_SEED = 0  # the split never changes with config.seed: results stay comparable


@functools.lru_cache(maxsize=1)  # both splits, and the pre-run data check, share one read
def _load():
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(
        "config.dataset='digits' needs scikit-learn: pip install scikit-learn (or the ctm-jax[digits] extra)"
    ) from e
  digits = datasets.load_digits()
  images_NxHxW = digits.images.astype(np.float32) / 16.0
  train, test = model_selection.train_test_split(
      np.arange(len(images_NxHxW)),
      test_size=TEST_RECORDS,
      random_state=SPLIT_SEED,
      stratify=digits.target,
  )
  return images_NxHxW, digits.target.astype(np.int32), train, test


def standardise(images_xHxW: np.ndarray) -> np.ndarray:
  """Pixels in [0, 1] (ink high) -> what the model reads: the train split's
  mean and std taken out, a channel axis added."""
  all_NxHxW, _, train, _ = _load()
  mean, std = all_NxHxW[train].mean(), all_NxHxW[train].std()
  return ((np.asarray(images_xHxW, np.float32) - mean) / std)[..., None].astype(np.float32)


class Digits:
  """Random-access records {'inputs': float32 (8, 8, 1), 'targets': int32 ()}."""

  def __init__(self, split: str = 'train'):
    if split not in ('train', 'eval'):
      raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    images_NxHxW, labels_N, train, test = _load()
    rows = train if split == 'train' else test
    self.split = split
    self.inputs_NxHxWxC = standardise(images_NxHxW[rows])
    self.targets_N = labels_N[rows]

  def __len__(self) -> int:
    return len(self.targets_N)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} out of range [0, {len(self)})')
    return {'inputs': self.inputs_NxHxWxC[index], 'targets': self.targets_N[index]}

  def __repr__(self) -> str:
    return f'Digits(split={self.split!r}, records={len(self)})'
