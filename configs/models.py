"""The reference's model configurations, one variant per training script.

`get_config(arg)` with arg in {parity, cifar10, imagenet, maze} returns a
ConfigDict with `task`, `input_shape` (one example, channels last) and `model`
(ContinuousThoughtMachine kwargs under the reference's argument names, so a
line of a reference shell script maps one to one onto `config.model`). Task
configs import this file and override, never copy.

  parity   tasks/parity/scripts/train_ctm_75_25.sh (length 64)
  cifar10  tasks/image_classification/scripts/train_cifar10.sh
  imagenet tasks/image_classification/scripts/train_imagenet.sh
  maze     a reduced tasks/mazes/scripts/train_ctm.sh: D 512, d_input 128,
           8 heads, 25 ticks x memory 15 (39x39 mazes, route 100)
"""

import ml_collections


def _model(**overrides):
  """The reference constructor's arguments with its defaults."""
  model = dict(
      prediction_reshaper=(-1,),
      dropout=0.0,
      dropout_nlm=None,
      neuron_select_type='random-pairing',
      n_random_pairing_self=0,
      do_layernorm_nlm=False,
      deep_nlms=True,
      positional_embedding_type='none',
      # Beyond the reference: compute dtype, tick rematerialisation, scan unroll.
      dtype='float32',
      remat='none',
      unroll=1,
  )
  model.update(overrides)
  return ml_collections.ConfigDict(model)


def _parity(length=64):
  return dict(
      task='parity',
      input_shape=(length,),
      model=_model(
          iterations=75,
          d_model=1024,
          d_input=512,
          heads=8,
          n_synch_out=32,
          n_synch_action=32,
          synapse_depth=1,
          memory_length=25,
          memory_hidden_dims=16,
          backbone_type='parity_backbone',
          positional_embedding_type='custom-rotational-1d',
          out_dims=2 * length,
          prediction_reshaper=(length, 2),
          neuron_select_type='random',
      ),
  )


def _cifar10():
  return dict(
      task='image_classification',
      input_shape=(32, 32, 3),
      model=_model(
          iterations=50,
          d_model=256,
          d_input=64,
          heads=16,
          n_synch_out=256,
          n_synch_action=512,
          synapse_depth=5,
          memory_length=15,
          memory_hidden_dims=64,
          backbone_type='resnet18-1',
          out_dims=10,
          dropout_nlm=0.0,
      ),
  )


def _imagenet():
  return dict(
      task='image_classification',
      input_shape=(224, 224, 3),
      model=_model(
          iterations=50,
          d_model=4096,
          d_input=1024,
          heads=16,
          n_synch_out=8196,
          n_synch_action=2048,
          n_random_pairing_self=32,
          synapse_depth=8,
          memory_length=25,
          memory_hidden_dims=64,
          backbone_type='resnet152-4',
          out_dims=1000,
          dropout=0.2,
          dropout_nlm=0.0,
      ),
  )


def _maze(route_length=100):
  return dict(
      task='maze',
      input_shape=(39, 39, 3),
      model=_model(
          iterations=25,
          d_model=512,
          d_input=128,
          heads=8,
          n_synch_out=64,
          n_synch_action=32,
          synapse_depth=8,
          memory_length=15,
          memory_hidden_dims=32,
          backbone_type='resnet34-2',
          out_dims=5 * route_length,
          prediction_reshaper=(route_length, 5),
          neuron_select_type='first-last',
          dropout=0.1,
      ),
  )


VARIANTS = {'parity': _parity, 'cifar10': _cifar10, 'imagenet': _imagenet, 'maze': _maze}


def get_config(arg: str = 'parity') -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f'config variant {arg!r} is unknown; expected one of {sorted(VARIANTS)}')
  return ml_collections.ConfigDict(VARIANTS[arg]())
