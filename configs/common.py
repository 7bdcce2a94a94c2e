"""Shared pieces of the config files: variant parsing, the trainer's keys with
their defaults, and the reference constructor's model options.

Config files import this as `ctm_jax.configs.common` (setup.py installs
configs/ as the package `ctm_jax.configs`), so they load from any directory.
"""

from collections.abc import Sequence

import ml_collections

from ctm_jax import sharding


def variant(arg: str | None, known: Sequence[str]) -> str:
  """The variant named after `:` in --config (the first of `known` when none is);
  a ValueError naming the known ones otherwise."""
  name = arg or known[0]
  if name not in known:
    raise ValueError(
        f'config variant {name!r} is unknown; expected one of {", ".join(map(repr, known))}'
    )
  return name


def trainer() -> ml_collections.ConfigDict:
  """Keys every config carries (validation.TRAIN_KEYS), with common defaults;
  each config then sets its reference script's values."""
  return ml_collections.ConfigDict(
      dict(
          # 'ctm', or a baseline the task offers ('lstm', 'ff'): the reference's --model(_type).
          model_type='ctm',
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
          # What init_from gives: 'all' (the same model's weights) or 'core' (another
          # task's CTM core; this task's input side and output head initialised afresh).
          init_from_parts='all',
          # The evaluators run at each eval, by name (comma-separated); 'default'
          # is the task's own list (tasks.Evaluated), e.g. 'default,calibration'.
          evals='default',
          # 'A,B': a jax.profiler trace of steps A..B into WORKDIR/profile/ ('' none).
          profile_steps='',
          # Device mesh: -1 takes the devices left over (see ctm_jax/sharding.py).
          mesh=sharding.default_mesh_config(),
      )
  )


def smoke_run(config: ml_collections.ConfigDict, batch_size: int) -> ml_collections.ConfigDict:
  """`config` as a seconds-long test run: 20 steps, a checkpoint and an eval
  every 10, two held-out batches."""
  config.update(
      batch_size=batch_size, batch_size_test=batch_size, n_test_batches=2, warmup_steps=2,
      training_iterations=20, save_every=10, track_every=10, log_every=5,
  )
  return config


def model(**options) -> ml_collections.ConfigDict:
  """ContinuousThoughtMachine options under the reference's argument names, with
  the reference constructor's defaults; the task adds out_dims and
  prediction_reshaper from its data."""
  defaults = dict(
      dropout=0.0,
      dropout_nlm=None,
      neuron_select_type='random-pairing',
      n_random_pairing_self=0,
      do_layernorm_nlm=False,
      deep_nlms=True,
      positional_embedding_type='none',
      # The LSTM baseline's depth (--num_layers; the CTM ignores it).
      num_layers=2,
      # Beyond the reference: compute dtype, tick rematerialisation, scan
      # unroll, weight gradients after the backward scan (models/deferred.py).
      dtype='float32',
      remat='none',
      unroll=1,
      deferred_grads=False,
      # ResNet backbones: rematerialise per residual block (models/backbones.py).
      backbone_remat='none',
  )
  return ml_collections.ConfigDict({**defaults, **options})
