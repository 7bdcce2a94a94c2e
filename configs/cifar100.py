"""CIFAR-100: the model, optimiser and augmentation of the reference's
train_cifar10.sh (its train.py takes CIFAR-100 with the same flags), with
CIFAR-100's normalisation and 100 classes.

Variants (`--config=configs/cifar100.py:<variant>`): default, smoke (a tiny
model for tests), as in configs/cifar10.py.

Prepare CIFAR-100 once (needs TensorFlow and internet, on any machine):
  pip install tensorflow tensorflow-datasets
  tfds build cifar100 --file_format=array_record --data_dir=~/tensorflow_datasets
Run:
  python -m ctm_jax.main --config=configs/cifar100.py --workdir=runs/cifar100
"""

from ctm_jax.configs import image

VARIANTS = image.REAL_DATA_VARIANTS


def get_config(arg: str | None = None):
  return image.real_data_config('cifar100', 100, arg)
