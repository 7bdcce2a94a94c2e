"""Image classification (the reference's tasks/image_classification): the base
that configs/cifar10.py, cifar100.py, imagenet.py and digits.py derive from.

Variants (`--config=configs/image.py:<variant>`):
  synthetic (default) train_cifar10.sh's model and optimiser on the synthetic
           dataset (learnable random 32x32 images; no download).
  smoke    for tests: D 64, 5 ticks, 16x16 synthetic images of 4 classes,
           60 steps (~40 s on a 2-core CPU, compilation included); the loss
           falls from ln 4 to ~0.5.

Data keys: `dataset` (synthetic | digits | cifar10 | cifar100 | imagenet2012,
see ctm_jax/data/images.py), `data_dir` (tfds data dir; '' = TFDS_DATA_DIR or
~/tensorflow_datasets), `augment` (the reference's train augmentation),
`dataset_size` (train records: the synthetic set's size; a prefix of a real
split, 0 = all of it).

Run:
  python -m ctm_jax.main --config=configs/image.py:smoke --workdir=runs/image_smoke

Every line of train_cifar10.sh is a flag of one command, but its `--model ctm`
line lacks the trailing backslash, so as written the script trains with
train.py's defaults; the flags it lists are what is meant and what `base()` sets.
"""

import ml_collections

from ctm_jax.configs import common
from ctm_jax.configs import models


VARIANTS = ('synthetic', 'smoke')
# Variants of the real-data configs derived from this base.
REAL_DATA_VARIANTS = ('default', 'smoke')


def base(dataset: str = 'cifar10', num_classes: int = 10) -> ml_collections.ConfigDict:
  """The reference's train_cifar10.sh, key for key, on `dataset`."""
  config = common.trainer()
  config.task = 'image_classification'
  config.model = models.cifar10()
  config.dataset = dataset
  config.num_classes = num_classes
  config.image_shape = (32, 32, 3)
  config.dataset_size = 0  # the whole train split
  config.data_dir = ''
  config.augment = True
  # AutoAugment runs in reader threads, beside the accelerator's step.
  config.num_read_threads = 8

  config.seed = 1
  config.batch_size = 512
  config.batch_size_test = 512
  # The script asks for 50 batches of 512; CIFAR-10's 10k test images hold 19
  # full ones, and the reference's eval stops when its loader runs out.
  config.n_test_batches = 19
  config.lr = 1e-4
  config.training_iterations = 600_001
  config.warmup_steps = 1000
  config.use_scheduler = True
  config.scheduler_type = 'cosine'
  config.weight_decay = 1e-4
  config.gradient_clipping = -1
  # The image train.py clips by global norm (the parity one by quantile).
  config.gradient_clipping_type = 'norm'
  config.use_most_certain = True
  config.save_every = 1000
  config.track_every = 2000
  config.log_every = 50
  config.n_attention_gifs = 2
  return config


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A tiny model and run for tests, keeping `config`'s data."""
  config.model.update(
      iterations=5,
      d_model=64,
      d_input=32,
      heads=2,
      n_synch_out=32,
      n_synch_action=32,
      synapse_depth=2,
      memory_length=4,
      memory_hidden_dims=4,
  )
  config.batch_size = 16
  config.batch_size_test = 16
  config.n_test_batches = 2
  config.lr = 3e-3
  config.warmup_steps = 5
  config.training_iterations = 60
  config.save_every = 30
  config.track_every = 30
  config.log_every = 10
  config.num_read_threads = 0
  config.n_attention_gifs = 0  # tests that check gifs ask for them
  return config


def real_data_config(dataset: str, num_classes: int, arg: str | None):
  """`get_config` of a real-data CIFAR config: 'default' (the script) or 'smoke'."""
  variant = common.variant(arg, REAL_DATA_VARIANTS)
  config = base(dataset=dataset, num_classes=num_classes)
  return smoke(config) if variant == 'smoke' else config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = common.variant(arg, VARIANTS)
  config = base(dataset='synthetic')
  config.dataset_size = 50_000  # CIFAR-10's train split
  if variant == 'smoke':
    config = smoke(config)
    config.num_classes = 4
    config.image_shape = (16, 16, 3)
    config.dataset_size = 512
  return config
