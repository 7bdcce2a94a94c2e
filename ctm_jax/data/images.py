"""Image-classification data: one dispatcher over the datasets the task reads.

`config.dataset`:
  synthetic     learnable random images, no download (below).
  digits        scikit-learn's bundled 8x8 digits: real data, no download
                (ctm_jax/data/digits.py).
  cifar10, cifar100, imagenet2012
                tfds array_record, with the reference's augmentation
                (ctm_jax/data/tfds_images.py); prepared once with `tfds build`.

Every source yields {'inputs': float32 (H, W, C), 'targets': int32 ()} records
(eval) or records that `train_transform(config)` turns into them (train).

`dataset='synthetic'`: class k has a fixed random prototype image P_k; a record
of class k is P_k + NOISE_SCALE * noise, with a fresh noise draw per record.
The classes are separable, so a smoke run shows the loss falling, and no
download is needed. Every record is a pure function of (seed, split, index), as
in data/parity.py, so any host or worker reads any record without
coordination, and resumed runs see the same data. The prototypes depend on the
seed only: train and eval splits share classes, never noise.

Dimension glossary: H image height, W image width, C image channels.
"""

import numbers

import grain
import numpy as np


from ctm_jax.data import digits as digits_data
from ctm_jax.data import tfds_images

DATASETS = ('synthetic', 'digits', *tfds_images.SPECS)

# Stream tags mixed into every seed: the splits' noise and the prototypes never
# share a key.
_STREAMS = {'train': 0, 'eval': 1, 'prototype': 2}

# Held-out size, that of CIFAR-10's test set, so an n_test_batches valid here
# stays valid when config.dataset names CIFAR-10.
EVAL_RECORDS = 10_000

# Per-pixel noise against unit-variance prototypes: the class signal dominates
# (a small CTM learns in tens of steps) while every record stays distinct.
NOISE_SCALE = 0.5


def _is_positive_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def check_config(config):
  """Raises ValueError naming the first bad image key (`config.<key>=<value>: why`).

  Reads no data: a run can be sized (compile_check) before its dataset exists.
  """
  dataset = config.dataset
  if dataset not in DATASETS:
    raise ValueError(f'config.dataset={dataset!r}: unknown; expected one of {", ".join(DATASETS)}')
  if not _is_positive_int(config.num_classes):
    raise ValueError(f'config.num_classes={config.num_classes!r}: must be a positive integer')
  shape = config.image_shape
  is_shape = isinstance(shape, (tuple, list)) and len(shape) == 3
  if not (is_shape and all(map(_is_positive_int, shape))):
    raise ValueError(
        f'config.image_shape={shape!r}: must be (height, width, channels), positive integers'
    )
  if not isinstance(config.data_dir, str):
    raise ValueError(f'config.data_dir={config.data_dir!r}: must be a path (a string)')
  if not isinstance(config.augment, bool):
    raise ValueError(f'config.augment={config.augment!r}: must be True or False')
  size = config.dataset_size
  if dataset == 'synthetic':
    if not _is_positive_int(size):
      raise ValueError(f'config.dataset_size={size!r}: must be a positive integer')
    return
  if not (_is_positive_int(size) or (size == 0 and not isinstance(size, bool))):
    raise ValueError(f'config.dataset_size={size!r}: train records to use; 0 takes the whole split')
  if dataset == 'digits':
    classes, expected_shape = digits_data.NUM_CLASSES, digits_data.IMAGE_SHAPE
    if tuple(shape) != expected_shape:
      raise ValueError(f'config.image_shape={tuple(shape)!r}: digits images are {expected_shape}')
  else:
    classes = tfds_images.SPECS[dataset].num_classes
    tfds_images.check_shape(dataset, shape)
  if config.num_classes != classes:
    raise ValueError(f'config.num_classes={config.num_classes!r}: {dataset} has {classes} classes')


def check_data(config):
  """Raises ValueError when the configured dataset cannot be read, saying how to fix it."""
  check_config(config)
  if config.dataset != 'synthetic':
    train_source(config)
    eval_source(config)


def record_spec(config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shape and dtype of one example's leaves, without reading data."""
  return {
      'inputs': (tuple(config.image_shape), np.dtype(np.float32)),
      'targets': ((), np.dtype(np.int32)),
  }


def read_image_file(path: str, dataset: str, image_shape) -> np.ndarray:
  """A picture file (PNG, JPEG, ...) as the model's eval input, float32 (H, W, C):
  for `dataset`'s preprocessing and `image_shape`. digits: grey, white ink on
  black as the dataset's (pass a dark-on-light drawing inverted), box-resized
  to 8x8; CIFAR: resized to the configured size; ImageNet: the eval resize
  and centre crop; each then normalised as in training."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import UnidentifiedImageError  # pylint: disable=g-import-not-at-top

  if dataset == 'synthetic':
    raise ValueError(f'--input={path}: synthetic images are not pictures; give a .npy of one {tuple(image_shape)} image')
  height, width, channels = image_shape
  try:
    with Image.open(path) as image:
      image = image.convert('L' if channels == 1 else 'RGB')
      if dataset == 'digits':
        grey_HxW = np.asarray(image.resize((width, height), Image.BOX), np.float32) / 255
        return digits_data.standardise(grey_HxW)
      if dataset != 'imagenet2012':
        image = image.resize((width, height), Image.BILINEAR)
      pixels = np.asarray(image, np.uint8)
  except (OSError, UnidentifiedImageError) as e:
    raise ValueError(f'--input={path}: not a picture PIL can read ({e})') from None
  return tfds_images.eval_image(pixels[..., None] if pixels.ndim == 2 else pixels, dataset, height)


class SyntheticImages:
  """Random-access records: grain's `RandomAccessDataSource` protocol.

  Record `index` is {'inputs': float32 (H, W, C), 'targets': int32 ()}.
  """

  def __init__(
      self,
      num_classes: int,
      image_shape: tuple[int, int, int],
      seed: int,
      num_records: int,
      split: str = 'train',
  ):
    if num_classes <= 0:
      raise ValueError(f'num_classes must be positive, got {num_classes}')
    if len(image_shape) != 3 or min(image_shape) <= 0:
      raise ValueError(f'image_shape must be 3 positive sizes (H, W, C), got {image_shape}')
    if num_records <= 0:
      raise ValueError(f'num_records must be positive, got {num_records}')
    if seed < 0:
      raise ValueError(f'seed must be non-negative, got {seed}')
    if split not in ('train', 'eval'):
      raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    self.num_classes = num_classes
    self.image_shape = tuple(int(n) for n in image_shape)
    self.seed = seed
    self.num_records = num_records
    self.split = split

  def prototype(self, label: int) -> np.ndarray:
    """Class `label`'s image, (H, W, C). Redrawn per call rather than stored, so
    a source stays a few bytes to pickle whatever the class count."""
    rng = np.random.default_rng([_STREAMS['prototype'], self.seed, label])
    return rng.standard_normal(self.image_shape, dtype=np.float32)

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f'record {index} out of range [0, {self.num_records})')
    # SeedSequence hashes the whole key: neighbouring indices and seeds give
    # independent streams.
    rng = np.random.default_rng([_STREAMS[self.split], self.seed, index])
    label = int(rng.integers(self.num_classes))
    noise_HxWxC = rng.standard_normal(self.image_shape, dtype=np.float32)
    image_HxWxC = self.prototype(label) + np.float32(NOISE_SCALE) * noise_HxWxC
    return {'inputs': image_HxWxC, 'targets': np.int32(label)}

  def __repr__(self) -> str:
    return (
        f'SyntheticImages(num_classes={self.num_classes}, image_shape={self.image_shape}, '
        f'seed={self.seed}, num_records={self.num_records}, split={self.split!r})'
    )


def train_source(config):
  """The train split of `config.dataset` (records for `train_transform`)."""
  check_config(config)
  if config.dataset == 'synthetic':
    return SyntheticImages(
        config.num_classes, config.image_shape, config.seed, config.dataset_size, split='train'
    )
  if config.dataset == 'digits':
    return _prefix(digits_data.Digits('train'), config.dataset_size)
  return tfds_images.train_source(config)


def train_transform(config):
  """(record, rng) -> example applied to every train record, or None."""
  if config.dataset in tfds_images.SPECS:
    return tfds_images.train_transform(config)
  return None


def eval_source(config):
  """The held-out split of `config.dataset`: model-ready records."""
  check_config(config)
  if config.dataset == 'synthetic':
    return SyntheticImages(
        config.num_classes, config.image_shape, config.seed, EVAL_RECORDS, split='eval'
    )
  if config.dataset == 'digits':
    return digits_data.Digits('eval')
  return tfds_images.eval_source(config)


def _prefix(source, size: int):
  if size > len(source):
    raise ValueError(f'config.dataset_size={size}: the train split has {len(source)} records')
  if size in (0, len(source)):
    return source
  return grain.MapDataset.source(source)[:size]
