"""Mazes (the reference's tasks/mazes): route prediction on maze pictures.

Variants (`--config=configs/maze.py:<variant>`):
  default  a reduced tasks/mazes/scripts/train_ctm.sh model (configs/models.py:
           maze): resnet34-2, D 512, 25 ticks x memory 15, first-last synch,
           on 39x39 mazes with routes of 100 moves; batch 16.
  smoke    a tiny model on 15x15 mazes, for tests.

Mazes are generated on the fly (seeded perfect mazes, no download);
`--config.data_dir=DIR` reads the reference's folders instead
(DIR/{train,test}/<class>/*.png, e.g. its mazes-small). Write a generated
dataset in that layout with `python -m ctm_jax.data.mazes --out=DIR`.
"""

import ml_collections

from ctm_jax.configs import common
from ctm_jax.configs import models


VARIANTS = ('default', 'smoke')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = common.variant(arg, VARIANTS)
  config = common.trainer()
  config.task = 'maze'
  config.model = models.maze()
  config.image_shape = (39, 39, 3)
  config.maze_route_length = 100
  config.cirriculum_lookahead = 5  # the reference's name and default
  config.data_dir = ''  # empty: generated mazes
  config.augment_p = 0.5  # the reference's MazeImageFolder default
  config.expand_range = True  # inputs in [-1, 1]; the reference's flag (train_ctm.sh: off)
  config.n_route_gifs = 2  # held-out mazes drawn at each eval (plots/route_<step>_<i>.gif)
  config.batch_size = 16
  config.batch_size_test = 64
  config.lr = 1e-4
  config.warmup_steps = 10_000
  config.training_iterations = 1_000_001
  config.gradient_clipping = 20.0
  config.gradient_clipping_type = 'norm'
  if variant == 'smoke':
    config.model.update(
        iterations=4,
        d_model=64,
        d_input=32,
        heads=2,
        n_synch_out=16,
        n_synch_action=16,
        synapse_depth=2,
        memory_length=4,
        memory_hidden_dims=4,
        backbone_type='resnet18-1',
    )
    config.image_shape = (15, 15, 3)
    config.maze_route_length = 10
    config.batch_size_test = 16
    config.n_test_batches = 2
    config.warmup_steps = 2
    config.training_iterations = 4
  return config
