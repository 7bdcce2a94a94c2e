"""Tracking: frames of a moving object in, where it will be out (the
community's CTM task; ctm_jax/data/tracking.py defines it, docs/data.md says
how): a single cell on a 16 x 16 grid, 4 frames at constant velocity (the 8
compass directions, one cell per step) with reflections off the walls; the
answer is its cell 4 steps after the last frame shown.

Variants (`--config=configs/tracking.py:<variant>`):
  quadrant, position   the community model card's configuration: 20 ticks x
                       memory 15, D 256, d_input 64, 4 heads, synch 32/32;
                       4 ticks per frame. The answer's quadrant (4 classes)
                       or its cell (256 classes).
  quadrant_small, position_small   a laptop's: D 128, 16 ticks.
  quadrant_smoke, position_smoke   seconds, for tests.
  lstm_<any of those>   the LSTM baseline at that size.
(no variant: quadrant)

Run:
  python -m ctm_jax.main --config=configs/tracking.py:quadrant_small --workdir=runs/tracking_quadrant_small
"""

import ml_collections

from ctm_jax.configs import common

SIZES = ('', '_small', '_smoke')
CTM_VARIANTS = tuple(t + s for t in ('quadrant', 'position') for s in SIZES)
VARIANTS = ('default', *CTM_VARIANTS, *(f'lstm_{v}' for v in CTM_VARIANTS))


def base(target: str) -> ml_collections.ConfigDict:
  config = common.trainer()
  config.task = 'object_tracking'
  config.tracking_target = target
  config.tracking_grid = 16
  config.tracking_frames = 4
  config.tracking_horizon = 4
  config.tracking_max_speed = 1
  config.n_tracking_gifs = 2
  config.model = common.model(
      iterations=20,
      d_model=256,
      d_input=64,
      heads=4,
      n_synch_out=32,
      n_synch_action=32,
      synapse_depth=1,
      memory_length=15,
      memory_hidden_dims=16,
      backbone_type='none',
      positional_embedding_type='none',
      neuron_select_type='random-pairing',
  )
  config.model.ticks_per_frame = 4
  config.model.patch_size = 4  # 4 x 4 cells a token (models/tracking.py)
  config.batch_size = 64
  config.batch_size_test = 256
  config.n_test_batches = 4
  config.lr = 1e-4
  config.training_iterations = 50_001
  config.warmup_steps = 500
  config.save_every = 5000
  config.track_every = 1000
  config.num_read_threads = 0  # synthetic records are cheap
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = common.variant(arg, VARIANTS)
  if variant == 'default':
    variant = 'quadrant'
  if variant.startswith('lstm_'):
    config = get_config(variant[len('lstm_'):])
    config.model_type = 'lstm'
    config.model.num_layers = 1
    return config
  target, _, size = variant.partition('_')
  config = base(target)
  if size == 'small':
    config.model.update(iterations=16, d_model=128, memory_length=10, memory_hidden_dims=8,
                        n_synch_out=16, n_synch_action=16)
    config.model.ticks_per_frame = 3
    config.lr = 1e-3
    config.warmup_steps = 200
    config.training_iterations = 10_000
    config.save_every = 1000
    config.track_every = 500
  elif size == 'smoke':
    config.model.update(iterations=6, d_model=32, d_input=16, heads=2, n_synch_out=8, n_synch_action=8,
                        memory_length=4, memory_hidden_dims=4)
    config.model.ticks_per_frame = 1
    config.model.patch_size = 2
    config.tracking_grid = 8
    config.tracking_frames = 3
    config.tracking_horizon = 2
    config.batch_size = 32
    config.batch_size_test = 32
    config.n_test_batches = 2
    config.n_tracking_gifs = 1
    config.lr = 1e-2
    config.warmup_steps = 5
    config.training_iterations = 40
    config.save_every = 20
    config.track_every = 20
    config.log_every = 10
  return config
