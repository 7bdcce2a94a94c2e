"""The reference's model options, one function per training script.

Each returns `config.model`: ContinuousThoughtMachine options under the
reference's argument names, so a line of a reference shell script maps one to
one onto `config.model`. The task configs take these and override, never copy;
the task adds out_dims and prediction_reshaper from its data.

  parity   tasks/parity/scripts/train_ctm_75_25.sh
  cifar10  tasks/image_classification/scripts/train_cifar10.sh
  imagenet tasks/image_classification/scripts/train_imagenet.sh
  maze     a reduced tasks/mazes/scripts/train_ctm.sh: D 512, d_input 128,
           8 heads, 25 ticks x memory 15
"""

from ctm_jax.configs import common


def parity():
  return common.model(
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
      neuron_select_type='random',
  )


def cifar10():
  return common.model(
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
      dropout_nlm=0.0,
  )


def imagenet():
  return common.model(
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
      dropout=0.2,
      dropout_nlm=0.0,
  )


def mazes():
  return common.model(
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
      neuron_select_type='first-last',
      dropout=0.1,
  )
