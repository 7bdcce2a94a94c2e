"""ImageNet (the reference's tasks/image_classification/scripts/train_imagenet.sh).

Variants (`--config=configs/imagenet.py:<variant>`):
  (default) the script: resnet152-4, D 4096, d_input 1024, synapse depth 8,
            16 heads, synch out 8196 / action 2048 random-pairing with 32 self
            pairs, 50 ticks x memory 25, NLM hidden 64, dropout 0.2; the global
            batch of its 8 GPUs x 64, lr 5e-4, norm clip 20, warmup 10k, cosine,
            500k iterations; bf16 compute (the script trains with AMP).
            ResNet blocks keep their convolutions' outputs and recompute
            their batch norms and ReLUs in the backward pass
            (model.backbone_remat='convs': memory, not values), so the
            script's batch of 512 fits 8 devices of 80 GB.
            Train augmentation RandomResizedCrop(224) + flip, eval Resize(256)
            + CenterCrop(224), the reference's normalisation.
  smoke     ImageNet records through a tiny model at 64x64, for tests (run on
            tfds mock data).
  synthetic the default model and optimiser on synthetic 224x224 images of
            1000 classes: the full model without ImageNet, for sizing and
            checking a machine (benchmarks/export_bench.py trains it a step).

Prepare ImageNet once: download ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar from image-net.org into MANUAL_DIR, then (needs
TensorFlow) on one machine
  tfds build imagenet2012 --file_format=array_record --manual_dir=MANUAL_DIR \
      --data_dir=DATA_DIR
and make DATA_DIR readable on every host (--config.data_dir=DATA_DIR).

Size a run first (per-device memory, FLOPs per step; reads no data), then launch:
  python -m ctm_jax.tools.compile_check --config=configs/imagenet.py --num_devices=16
  launch/tpu_pod.sh --tpu=NAME --zone=ZONE -- \
      python -m ctm_jax.main --config=configs/imagenet.py --workdir=~/gcs/imagenet
"""

import ml_collections

from ctm_jax.configs import common
from ctm_jax.configs import image
from ctm_jax.configs import models


VARIANTS = ('default', 'smoke', 'synthetic')


def base() -> ml_collections.ConfigDict:
  config = image.base()
  config.model = models.imagenet()
  config.model.dtype = 'bfloat16'
  # The batch norms' float32 intermediates were half the per-device memory;
  # 'block' saves a little more for a second forward of the backbone
  # (docs/scaling.md, ImageNet on 8 devices).
  config.model.backbone_remat = 'convs'
  config.dataset = 'imagenet2012'
  config.num_classes = 1000
  config.image_shape = (224, 224, 3)
  # JPEG decoding and crops run in reader threads; raise num_workers_train on
  # hosts with many cores (a resumed run must keep the same count).
  config.num_read_threads = 16

  config.seed = 1
  # The script's --batch_size is per GPU, on 8 GPUs.
  config.batch_size = 8 * 64
  config.batch_size_test = 8 * 64
  config.n_test_batches = 200 // 8
  config.lr = 5e-4
  config.gradient_clipping = 20.0
  config.gradient_clipping_type = 'norm'
  config.training_iterations = 500_001
  config.save_every = 1000
  config.track_every = 5000
  config.warmup_steps = 10_000
  config.use_scheduler = True
  config.scheduler_type = 'cosine'
  config.weight_decay = 0.0
  # Every device splits the batch and the large kernels (ZeRO-3), so the config
  # runs unchanged on 1 device or a pod; across pod slices, set mesh.data to
  # the number of slices.
  config.mesh.data = 1
  config.mesh.fsdp = -1
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = common.variant(arg, VARIANTS)
  if variant == 'default':
    return base()
  if variant == 'synthetic':
    config = base()
    config.dataset = 'synthetic'
    config.dataset_size = 10_000
    config.num_read_threads = 0
    config.n_attention_gifs = 0
    return config
  config = base()  # smoke
  config.model.update(
      d_model=64,
      d_input=32,
      heads=2,
      n_synch_out=32,
      n_synch_action=32,
      n_random_pairing_self=4,
      synapse_depth=2,
      iterations=3,
      memory_length=4,
      memory_hidden_dims=4,
      backbone_type='resnet18-1',
      dtype='float32',
  )
  config.image_shape = (64, 64, 3)
  config.num_read_threads = 0
  config.batch_size = 16
  config.batch_size_test = 16
  config.n_test_batches = 1
  config.warmup_steps = 2
  config.training_iterations = 4
  config.save_every = 2
  config.track_every = 4
  config.log_every = 2
  return config
