"""Q&A-MNIST (the reference's tasks/qamnist): digits, then a question, then the answer.

Variants (`--config=configs/qamnist.py:<variant>`):
  (default) tasks/qamnist/scripts/train_ctm_10.sh, key for key: MNIST,
            3 +- 2 digits and operations, each input shown 10 ticks, 10
            answer ticks, D 1024, d_input 64, memory 30, batch 64, lr 1e-4,
            warmup 500, cosine, 300k iterations, seed 2.
  ctm_1     train_ctm_1.sh: one tick per input, one answer tick, memory 3, seed 0.
  lstm_10, lstm_1: train_lstm_10.sh / train_lstm_1.sh, the LSTM baseline at
            the scripts' parameter-matched widths (875, 741), last-tick loss.
  small     no download (scikit-learn's digits at 28x28), a laptop run (see
            its comment); lstm_small: the LSTM baseline at the same size.
  smoke, lstm_smoke: seconds, for tests.

MNIST comes through tfds (`tfds build mnist --file_format=array_record`, then
--config.data_dir=DIR). Run:
  python -m ctm_jax.main --config=configs/qamnist.py:small --workdir=runs/qamnist_small
"""

import ml_collections

from ctm_jax.configs import common

# train_lstm_<repeats>.sh: the parameter-matched LSTM width.
LSTM_WIDTHS = {10: 875, 1: 741}
VARIANTS = ('default', 'ctm_1', 'lstm_10', 'lstm_1', 'small', 'lstm_small', 'smoke', 'lstm_smoke')


def base(repeats: int = 10) -> ml_collections.ConfigDict:
  """train_ctm_<repeats>.sh (10 or 1), key for key."""
  config = common.trainer()
  config.task = 'qamnist'
  config.dataset = 'mnist'
  config.data_dir = ''
  config.q_num_images = 3
  config.q_num_images_delta = 2
  config.q_num_repeats_per_input = repeats
  config.q_num_operations = 3
  config.q_num_operations_delta = 2
  config.q_num_answer_steps = repeats
  # Beyond the script: gifs of this many held-out questions at every eval
  # (the script draws one batch's at each track).
  config.n_attention_gifs = 2
  config.model = common.model(
      iterations=50,  # the script's default; unused: the ticks follow the question
      d_model=1024,
      d_input=64,
      heads=4,
      n_synch_out=32,
      n_synch_action=32,
      synapse_depth=1,
      memory_length=30 if repeats == 10 else 3,
      memory_hidden_dims=16,
      deep_nlms=True,
      do_layernorm_nlm=False,
      dropout=0.0,
      neuron_select_type='random',
      n_random_pairing_self=256,
      backbone_type='none',
      num_layers=1,  # the LSTM baseline's one LSTMCell
  )
  config.seed = 2 if repeats == 10 else 0  # the scripts' RUN - 1
  config.batch_size = 64
  config.batch_size_test = 256
  config.n_test_batches = 20
  config.lr = 1e-4
  config.training_iterations = 300_001
  config.warmup_steps = 500
  config.use_scheduler = True
  config.scheduler_type = 'cosine'
  config.milestones = (0, 0, 0)
  config.gamma = 0.0
  config.weight_decay = 0.0
  config.track_every = 1000
  config.save_every = 10_000
  return config


def offline(answer_steps: int) -> ml_collections.ConfigDict:
  """train_ctm_1.sh's recipe on scikit-learn's digits (no download): 1-2
  digits and 1-2 operations, one tick per input, `answer_steps` to answer."""
  config = base(1)
  config.dataset = 'digits'
  config.q_num_images = 2
  config.q_num_images_delta = 1
  config.q_num_operations = 2
  config.q_num_operations_delta = 1
  config.q_num_answer_steps = answer_steps
  config.seed = 0
  return config


def lstm(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The LSTM baseline as the script trains it: the last tick's loss."""
  config.model_type = 'lstm'
  config.use_most_certain = False
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = common.variant(arg, VARIANTS)
  if variant == 'default':
    return base(10)
  if variant == 'ctm_1':
    return base(1)
  if variant in ('lstm_10', 'lstm_1'):
    repeats = int(variant.split('_')[1])
    config = lstm(base(repeats))
    config.model.d_model = LSTM_WIDTHS[repeats]
    return config
  if variant.startswith('lstm_'):
    return lstm(get_config(variant[len('lstm_'):]))
  if variant == 'small':
    # 95% answer accuracy in 16.5 minutes on a 2-core CPU (docs/results.md).
    config = offline(answer_steps=3)
    config.model.update(
        d_model=256, d_input=32, heads=2, n_synch_out=32, n_synch_action=16, memory_length=5,
        memory_hidden_dims=8,
    )
    config.batch_size = 64
    config.batch_size_test = 256
    config.n_test_batches = 4
    config.lr = 1e-3
    config.warmup_steps = 500
    config.training_iterations = 10_000
    config.track_every = 1000
    config.save_every = 2000
    return config
  # smoke
  config = offline(answer_steps=2)
  config.model.update(
      d_model=32, d_input=8, heads=2, n_synch_out=8, n_synch_action=8, memory_length=3,
      memory_hidden_dims=2,
  )
  common.smoke_run(config, batch_size=8)
  config.n_attention_gifs = 1
  return config
