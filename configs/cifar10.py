"""CIFAR-10: the reference's tasks/image_classification/scripts/train_cifar10.sh.

Variants (`--config=configs/cifar10.py:<variant>`):
  default  resnet18-1, D 256, d_input 64, synapse depth 5, 16 heads, synch
           256 out / 512 action random-pairing, 50 ticks x memory 15, NLM
           hidden 64; batch 512, lr 1e-4, warmup 1000, cosine, weight decay
           1e-4, 600k iterations; AutoAugment (CIFAR10 policy) and the
           reference's normalisation (configs/image.py holds the values).
  smoke    the same data through a tiny model, 60 steps (tests run it on
           tfds mock data).

Prepare CIFAR-10 once (needs TensorFlow and internet, on any machine):
  pip install tensorflow tensorflow-datasets
  tfds build cifar10 --file_format=array_record --data_dir=~/tensorflow_datasets
Run:
  python -m ctm_jax.main --config=configs/cifar10.py --workdir=runs/cifar10
Data elsewhere: --config.data_dir=DIR. More devices: nothing changes (the mesh
splits the batch over all of them).
"""

from ctm_jax.configs import image

VARIANTS = image.REAL_DATA_VARIANTS


def get_config(arg: str | None = None):
  return image.real_data_config('cifar10', 10, arg)
