"""Cumulative parity (the reference's tasks/parity), the default task.

Variants (`--config=configs/parity.py:<variant>`):
  (default) tasks/parity/scripts/train_ctm_75_25.sh: length 64, D 1024,
            75 ticks x memory 25, batch 64, lr 1e-4, warmup 500, cosine,
            quantile clip 0.9, 200k iterations.
  small     length 12, D 128, 25 ticks x memory 10: 99% per-bit held-out
            accuracy on a 2-core CPU in about 4 minutes (seeds 0-2).
  smoke     seconds, for tests.

Run:
  python -m ctm_jax.main --config=configs/parity.py:small --workdir=runs/parity_small
Overrides use the reference's argument names, e.g. `--config.lr=3e-4`,
`--config.model.iterations=50`.
"""

import ml_collections

from ctm_jax.configs import common
from ctm_jax.configs import models

VARIANTS = ('default', 'small', 'smoke')


def base(length: int = 64) -> ml_collections.ConfigDict:
  """The reference's train_ctm_75_25.sh, key for key."""
  config = common.trainer()
  config.task = 'parity'
  config.parity_sequence_length = length
  config.model = models.parity()
  config.seed = 0
  config.batch_size = 64
  config.batch_size_test = 256
  config.lr = 1e-4
  config.training_iterations = 200_001
  config.warmup_steps = 500
  config.scheduler_type = 'cosine'
  config.gradient_clipping = 0.9
  config.gradient_clipping_type = 'quantile'
  config.save_every = 10_000
  # Synthetic records are cheap: reader threads cost more than they save.
  config.num_read_threads = 0
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = common.variant(arg, VARIANTS)
  if variant == 'default':
    return base()
  if variant == 'small':
    # 12 bits, not 16: at 16 some seeds stall for good with the last bits at
    # chance (docs/results.md); at 12 every seed tried reaches 99%.
    config = base(length=12)
    config.model.update(
        iterations=25,
        d_model=128,
        d_input=64,
        heads=4,
        n_synch_out=16,
        n_synch_action=16,
        memory_length=10,
        memory_hidden_dims=8,
    )
    config.batch_size = 64
    config.lr = 1e-3
    config.warmup_steps = 200
    config.training_iterations = 6000
    config.save_every = 1000
    config.track_every = 500
    config.n_test_batches = 4
    return config
  # smoke: independent of `small`, so tuning the first run never moves the tests.
  config = base(length=8)
  config.model.update(
      iterations=6,
      d_model=32,
      d_input=16,
      heads=2,
      n_synch_out=8,
      n_synch_action=8,
      memory_length=4,
      memory_hidden_dims=4,
  )
  config.batch_size = 64
  config.batch_size_test = 32
  config.n_test_batches = 2
  config.lr = 1e-2
  config.warmup_steps = 5
  config.training_iterations = 60
  config.save_every = 20
  config.track_every = 30
  config.log_every = 10
  return config
