"""Mazes (the reference's tasks/mazes): route prediction on maze pictures.

Variants (`--config=configs/mazes.py:<variant>`):
  default         tasks/mazes/scripts/train_ctm.sh key for key: mazes-large
                  (99x99), D 2048, 75 ticks x memory 25, resnet34-2, routes
                  of 100 moves, batch 64, lr 1e-4, warmup 10k, cosine, 1M steps.
  medium          the reference README's paper command on mazes-medium (39x39).
  reference_small the reference README's mazes-small command (39x39, routes of
                  50, D 1024, resnet18-1; "12-24 hours without a GPU" there).
  small           laptop-sized: 11x11 mazes (5x5 cells), routes of 20 moves,
                  D 256, 16 ticks; learns on a 2-core CPU within an hour
                  (README, "Mazes").
  smoke           a tiny model on 15x15 mazes, for tests.
  benchmark       the reduced train_ctm.sh model the speed table times
                  (D 512, 25 ticks x memory 15, batch 16).

Mazes are generated on the fly (seeded perfect mazes, no download);
`--config.data_dir=DIR` reads the reference's folders instead
(DIR/{train,test}/<class>/*.png, e.g. its mazes-small), and
`--config.data_dir=hf://SakanaAI/mazes-large` the Hub's (the hub extra). Write a generated
dataset in that layout with `python -m ctm_jax.data.mazes --out=DIR`.

Run:
  python -m ctm_jax.main --config=configs/mazes.py:small --workdir=runs/mazes_small
"""

import ml_collections

from ctm_jax.configs import common
from ctm_jax.configs import models

VARIANTS = ('default', 'medium', 'reference_small', 'small', 'smoke', 'benchmark')


def base() -> ml_collections.ConfigDict:
  """tasks/mazes/scripts/train_ctm.sh (mazes-large), key for key; train.py's
  defaults for the keys it does not pass."""
  config = common.trainer()
  config.task = 'mazes'
  config.model = common.model(
      iterations=75,
      d_model=2048,
      d_input=512,
      heads=16,
      synapse_depth=8,
      n_synch_out=64,
      n_synch_action=32,
      neuron_select_type='first-last',
      memory_length=25,
      deep_nlms=True,  # --deep_memory
      memory_hidden_dims=32,
      backbone_type='resnet34-2',
      positional_embedding_type='none',
      dropout=0.1,
  )
  config.image_shape = (99, 99, 3)  # mazes-large
  config.maze_route_length = 100
  config.cirriculum_lookahead = 5  # the reference's spelling
  config.data_dir = ''  # empty: generated mazes
  config.augment_p = 0.5  # the reference's MazeImageFolder default
  config.expand_range = False  # --no-expand_range: inputs in [0, 1]
  config.n_route_gifs = 2  # held-out mazes drawn at each eval (plots/route_<step>_<i>.gif)
  config.seed = 412  # train.py's default
  config.batch_size = 64
  config.batch_size_test = 128
  config.n_test_batches = 20
  config.lr = 1e-4
  config.weight_decay = 0.0
  config.gradient_clipping = -1.0
  config.use_scheduler = True
  config.scheduler_type = 'cosine'
  config.warmup_steps = 10_000
  config.training_iterations = 1_000_001
  config.save_every = 1000
  config.track_every = 1000
  # Not a reference key: one core generates ~55 99x99 mazes/s, under one step's
  # batch (benchmarks/mazes_data_bench.py), so generation runs in workers.
  config.num_workers_train = 8
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = common.variant(arg, VARIANTS)
  config = base()
  if variant == 'default':
    return config
  if variant == 'medium':
    # tasks/mazes/README.md, "Training": the paper's run.
    config.model.update(synapse_depth=4, heads=8)
    config.image_shape = (39, 39, 3)
    config.expand_range = True  # not passed there: train.py's default
    config.batch_size_test = 64
    config.save_every = 2000
    config.track_every = 5000
    config.seed = 42
    config.n_test_batches = 50
    config.num_workers_train = 4  # ~380 39x39 mazes/s per core
    return config
  if variant == 'reference_small':
    # tasks/mazes/README.md, "Small training run".
    config.model = common.model(
        iterations=50,
        d_model=1024,
        d_input=256,
        heads=4,
        synapse_depth=8,
        n_synch_out=128,
        n_synch_action=128,
        neuron_select_type='random-pairing',
        memory_length=25,
        deep_nlms=True,
        memory_hidden_dims=32,
        backbone_type='resnet18-1',
        positional_embedding_type='none',
        dropout=0.0,
    )
    config.image_shape = (39, 39, 3)
    config.maze_route_length = 50
    config.expand_range = True
    config.training_iterations = 100_001
    config.warmup_steps = 5000
    config.batch_size_test = 32
    config.n_test_batches = 50
    config.track_every = 2000
    config.num_workers_train = 0  # a CPU run: the step, not generation, is the bottleneck
    return config
  if variant == 'small':
    config.model = common.model(
        iterations=16,
        d_model=256,
        d_input=64,
        heads=4,
        synapse_depth=2,
        n_synch_out=64,
        n_synch_action=32,
        neuron_select_type='random-pairing',
        memory_length=8,
        deep_nlms=True,
        memory_hidden_dims=8,
        backbone_type='resnet18-1',
        positional_embedding_type='none',
        dropout=0.0,
    )
    config.image_shape = (11, 11, 3)
    config.maze_route_length = 20
    config.expand_range = True
    config.seed = 0
    config.batch_size = 64
    config.batch_size_test = 200
    config.n_test_batches = 5  # all 1000 generated held-out mazes
    config.lr = 1e-3
    config.warmup_steps = 300
    config.training_iterations = 15_000
    config.gradient_clipping = 1.0
    config.gradient_clipping_type = 'norm'
    config.save_every = 1000
    config.track_every = 1000
    config.num_workers_train = 0  # 3700 mazes/s on one core feed ~58 steps/s
    return config
  if variant == 'benchmark':
    config.model = models.mazes()
    config.image_shape = (39, 39, 3)
    config.expand_range = True
    config.batch_size = 16
    config.batch_size_test = 64
    config.gradient_clipping = 20.0
    return config
  # smoke: independent of `small`, so tuning the laptop run never moves the tests.
  config.model = common.model(
      iterations=4,
      d_model=64,
      d_input=32,
      heads=2,
      n_synch_out=16,
      n_synch_action=16,
      synapse_depth=2,
      memory_length=4,
      memory_hidden_dims=4,
      neuron_select_type='first-last',
      backbone_type='resnet18-1',
      dropout=0.1,
  )
  config.image_shape = (15, 15, 3)
  config.maze_route_length = 10
  config.expand_range = True
  config.seed = 0
  config.batch_size = 16
  config.batch_size_test = 16
  config.n_test_batches = 2
  config.warmup_steps = 2
  config.training_iterations = 4
  config.gradient_clipping = 20.0
  config.num_workers_train = 0
  return config
