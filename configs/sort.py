"""Sorting N real numbers (the reference's tasks/sort), trained with CTC.

Variants (`--config=configs/sort.py:<variant>`):
  (default) tasks/sort/train.py's defaults (the task has no train scripts):
            N 30, D 512, 50 ticks x memory 25, synapse U-Net depth 4, synch
            out 32, NLM hidden 4, batch 32, lr 1e-3, warmup 5000, cosine,
            100k iterations, seed 412, no clipping. The script's --heads and
            --n_synch_action are accepted and unused: the sort model has no
            attention and no action synch.
  small     N 10, D 128, 20 ticks, 40k steps: 90% per position in 18.5
            minutes on a 2-core CPU (docs/results.md).
  smoke     seconds, for tests.

Run:
  python -m ctm_jax.main --config=configs/sort.py:small --workdir=runs/sort_small
"""

import ml_collections

from ctm_jax.configs import common

VARIANTS = ('default', 'small', 'smoke')


def base(size: int = 30) -> ml_collections.ConfigDict:
  config = common.trainer()
  config.task = 'sort'
  config.N_to_sort = size
  config.model = common.model(
      iterations=50,
      d_model=512,
      d_input=size,  # the model reads the N numbers as they are
      heads=4,
      n_synch_out=32,
      n_synch_action=32,
      synapse_depth=4,
      memory_length=25,
      memory_hidden_dims=4,
      backbone_type='none',
  )
  config.seed = 412
  config.batch_size = 32
  config.batch_size_test = 32
  # The script's loop stops after batch n_test_batches, so it evaluates 3.
  config.n_test_batches = 3
  config.lr = 1e-3
  config.training_iterations = 100_001
  config.warmup_steps = 5000
  config.scheduler_type = 'cosine'
  config.save_every = 1000
  config.track_every = 1000
  config.num_read_threads = 0
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = common.variant(arg, VARIANTS)
  if variant == 'default':
    return base()
  if variant == 'small':
    config = base(size=10)
    config.model.update(
        iterations=20, d_input=10, d_model=128, synapse_depth=1, n_synch_out=32,
        memory_length=10, memory_hidden_dims=4,
    )
    config.batch_size = 64
    config.batch_size_test = 200
    config.n_test_batches = 5
    config.warmup_steps = 500
    # 90% per position at step 30000, 18.5 minutes on a 2-core CPU (docs/results.md).
    config.training_iterations = 40_000
    config.track_every = 1000
    config.save_every = 2000
    return config
  config = base(size=6)
  config.model.update(
      iterations=10, d_input=6, d_model=32, synapse_depth=2, n_synch_out=8, memory_length=4,
      memory_hidden_dims=2, heads=0, n_synch_action=0,
  )
  common.smoke_run(config, batch_size=16)
  return config
