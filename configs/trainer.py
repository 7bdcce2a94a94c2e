"""Trainer keys every task config carries, with common defaults; each task config
then sets the values of its reference script."""

import ml_collections

from ctm_jax import sharding


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          seed=0,
          batch_size=32,
          batch_size_test=32,
          n_test_batches=20,
          lr=1e-4,
          training_iterations=100_001,
          warmup_steps=0,
          use_scheduler=True,
          scheduler_type='cosine',
          milestones=(8000, 15000, 20000),
          gamma=0.1,
          weight_decay=0.0,
          weight_decay_exclude=(),
          gradient_clipping=-1.0,  # disabled
          gradient_clipping_type='norm',
          use_most_certain=True,
          save_every=1000,
          track_every=1000,
          log_every=50,
          # Beyond the reference.
          keep_checkpoints=3,
          num_workers_train=0,
          num_read_threads=0,
          init_from='',
          # Eval: attention gifs of the first n eval images (image tasks).
          n_attention_gifs=0,
          # Device mesh: -1 takes the devices left over (see ctm_jax/sharding.py).
          mesh=sharding.default_mesh_config(),
      )
  )
