"""CIFAR-10, CIFAR-100 and ImageNet-1k through `tfds.data_source` (array_record).

TensorFlow is not needed to read: tfds reads array_record files prepared once
with `tfds build` (which does need it, or a machine that has it). Records come
out as uint8 images; the reference's preprocessing follows:

  dataset       train (random, per record)            eval
  cifar10/100   AutoAugment CIFAR10 policy, normalise  normalise
  imagenet2012  RandomResizedCrop(S), flip, normalise  Resize(S*256/224), CenterCrop(S), normalise

S is `config.image_shape[0]` (224 as in the reference; smaller for quick runs).
Normalisation uses the reference's per-dataset means and stds. Augmentation runs
in grain's reader threads or worker processes (ctm_jax/data/pipeline.py).

Dimension glossary: H image height, W image width, C image channels.
"""

import dataclasses
import functools
import os

import numpy as np

from ctm_jax import extras
from ctm_jax import storage
from ctm_jax.data import augment


@dataclasses.dataclass(frozen=True)
class Spec:
  tfds_name: str
  train_split: str
  eval_split: str
  num_classes: int
  image_shape: tuple[int, int, int]  # what the model sees by default
  mean: tuple[float, ...]
  std: tuple[float, ...]
  how_to_prepare: str


_BUILD = (
    'pip install tensorflow tensorflow-datasets && tfds build {name} --file_format=array_record '
    '--data_dir=DIR{extra}'
)

SPECS = {
    'cifar10': Spec(
        'cifar10',
        'train',
        'test',
        10,
        (32, 32, 3),
        augment.CIFAR10_MEAN,
        augment.CIFAR10_STD,
        _BUILD.format(name='cifar10', extra=''),
    ),
    'cifar100': Spec(
        'cifar100',
        'train',
        'test',
        100,
        (32, 32, 3),
        augment.CIFAR100_MEAN,
        augment.CIFAR100_STD,
        _BUILD.format(name='cifar100', extra=''),
    ),
    'imagenet2012': Spec(
        'imagenet2012',
        'train',
        'validation',
        1000,
        (224, 224, 3),
        augment.IMAGENET_MEAN,
        augment.IMAGENET_STD,
        # ImageNet is not downloadable by tfds: the archives come from image-net.org.
        'download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org into '
        'MANUAL_DIR, then ' + _BUILD.format(name='imagenet2012', extra=' --manual_dir=MANUAL_DIR'),
    ),
}

# ImageNet's eval resize relative to its crop: Resize(256) before CenterCrop(224).
_EVAL_RESIZE = 256 / 224


def check_shape(dataset: str, image_shape, field: str = 'image_shape'):
  """Raises ValueError when the model's image shape cannot come from `dataset`."""
  spec = SPECS[dataset]
  shape = tuple(image_shape)
  if dataset == 'imagenet2012':
    if shape[0] != shape[1] or shape[2] != 3:
      raise ValueError(
          f'config.{field}={shape!r}: ImageNet crops are square RGB, (S, S, 3); S=224 as in the '
          'reference'
      )
  elif shape != spec.image_shape:
    raise ValueError(f'config.{field}={shape!r}: {dataset} images are {spec.image_shape}')


def open_split(dataset: str, split: str, data_dir: str, spec: Spec | None = None):
  """`tfds.data_source` of one split, or a ValueError saying how to prepare it.
  `spec` for a dataset outside SPECS (Q&A-MNIST's MNIST)."""
  tfds = extras.module('tensorflow_datasets', f'config.dataset={dataset!r}')
  spec = spec or SPECS[dataset]
  if storage.is_url(data_dir):
    # gs:// read natively (array_record's reader and tfds's epath); another scheme refused
    data_dir = storage.resolve(data_dir, 'config.data_dir')
  where = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  try:
    return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # tfds raises many types here; all mean "not readable"
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(
        f'config.dataset={dataset!r}: split {split!r} is not prepared as array_record in '
        f'config.data_dir={where!r} ({reason}). Prepare it with: {spec.how_to_prepare}; then pass '
        '--config.data_dir=DIR (or set TFDS_DATA_DIR).'
    ) from e


class TfdsImages:
  """Random-access records of a tfds split: grain's `RandomAccessDataSource`.

  Record `index` is {'image': uint8 (H, W, C), 'label': int32 ()} as stored,
  or, with `preprocess`, whatever it makes of that (the eval split's
  deterministic {'inputs', 'targets'}). `num_records` takes a prefix.
  """

  def __init__(
      self, dataset: str, split: str, data_dir: str, num_records: int = 0, preprocess=None
  ):
    self.dataset, self.split, self.data_dir = dataset, split, data_dir
    self._source = open_split(dataset, split, data_dir)
    available = len(self._source)
    if num_records > available:
      raise ValueError(
          f'config.dataset_size={num_records}: {dataset} split {split!r} has {available} records'
      )
    self.num_records = num_records or available
    self.preprocess = preprocess

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int):
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f'record {index} out of range [0, {self.num_records})')
    raw = self._source[index]
    record = {'image': np.asarray(raw['image'], np.uint8), 'label': np.int32(raw['label'])}
    return record if self.preprocess is None else self.preprocess(record)

  def __repr__(self) -> str:
    return (
        f'TfdsImages({self.dataset!r}, split={self.split!r}, data_dir={self.data_dir!r}, '
        f'num_records={self.num_records})'
    )


def _example(image_HxWxC, label, spec: Spec) -> dict[str, np.ndarray]:
  return {
      'inputs': augment.normalize(image_HxWxC, spec.mean, spec.std),
      'targets': np.int32(label),
  }


def _eval_image(image_HxWxC, dataset: str, size: int):
  if dataset == 'imagenet2012':
    image_HxWxC = augment.resize_shorter(image_HxWxC, int(round(size * _EVAL_RESIZE)))
    image_HxWxC = augment.center_crop(image_HxWxC, size)
  return image_HxWxC


def eval_image(image_HxWxC, dataset: str, size: int) -> np.ndarray:
  """A uint8 picture -> the model's deterministic eval input, float32."""
  spec = SPECS[dataset]
  return augment.normalize(_eval_image(image_HxWxC, dataset, size), spec.mean, spec.std)


def eval_preprocess(record, *, dataset: str, size: int):
  """A stored record -> the model's deterministic eval example."""
  spec = SPECS[dataset]
  return _example(_eval_image(record['image'], dataset, size), record['label'], spec)


def train_preprocess(record, rng: np.random.Generator, *, dataset: str, size: int, augmented: bool):
  """A stored record -> a train example, augmented when `augmented` (grain's random_map)."""
  spec = SPECS[dataset]
  image_HxWxC = record['image']
  if not augmented:
    image_HxWxC = _eval_image(image_HxWxC, dataset, size)
  elif dataset == 'imagenet2012':
    image_HxWxC = augment.random_resized_crop(image_HxWxC, rng, size=size)
    image_HxWxC = augment.horizontal_flip(image_HxWxC, rng)
  else:
    image_HxWxC = augment.auto_augment_cifar10(image_HxWxC, rng)
  return _example(image_HxWxC, record['label'], spec)


def train_source(config) -> TfdsImages:
  return TfdsImages(
      config.dataset, SPECS[config.dataset].train_split, config.data_dir, config.dataset_size
  )


def train_transform(config):
  """Picklable (record, rng) -> example for grain's random_map."""
  return functools.partial(
      train_preprocess,
      dataset=config.dataset,
      size=config.image_shape[0],
      augmented=bool(config.augment),
  )


def eval_source(config) -> TfdsImages:
  preprocess = functools.partial(
      eval_preprocess, dataset=config.dataset, size=config.image_shape[0]
  )
  return TfdsImages(
      config.dataset, SPECS[config.dataset].eval_split, config.data_dir, preprocess=preprocess
  )
