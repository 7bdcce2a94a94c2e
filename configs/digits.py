"""Real data on a laptop: scikit-learn's bundled 8x8 handwritten digits.

No download: the 1797 images ship inside scikit-learn (a core dependency).
1437 train / 360 test, a fixed stratified split. A small CTM (resnet18-1 stem
and first stage, D 128, 10 ticks) on a 2-core CPU, compilation included:
docs/results.md, "Real digits on a laptop CPU".

Variants (`--config=configs/digits.py:<variant>`):
  default  the demo: 1000 steps at batch 64.
  smoke    a short run for tests.

Run:
  python -m ctm_jax.main --config=configs/digits.py --workdir=runs/digits
"""

from ctm_jax.configs import common
from ctm_jax.configs import image


VARIANTS = ('default', 'smoke')


def get_config(arg: str | None = None):
  variant = common.variant(arg, VARIANTS)
  config = image.base(dataset='digits', num_classes=10)
  config.image_shape = (8, 8, 1)
  config.augment = False
  config.num_read_threads = 0
  config.model.update(
      iterations=10,
      d_model=128,
      d_input=32,
      heads=2,
      n_synch_out=64,
      n_synch_action=32,
      synapse_depth=1,
      memory_length=5,
      memory_hidden_dims=8,
      backbone_type='resnet18-1',
  )
  config.seed = 0
  config.batch_size = 64
  config.batch_size_test = 72
  config.n_test_batches = 5  # the whole test split
  config.lr = 1e-3
  config.warmup_steps = 50
  config.weight_decay = 0.0
  config.training_iterations = 1000
  config.save_every = 500
  config.track_every = 250
  config.log_every = 50
  if variant == 'smoke':
    config.training_iterations = 300
    config.save_every = 300
    config.track_every = 300
  return config
