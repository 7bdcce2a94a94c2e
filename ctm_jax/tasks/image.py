"""Image classification (the reference's tasks/image_classification).

Inputs NHWC float images, targets (B,) class ids; data from ctm_jax/data/images.py
(synthetic, digits, CIFAR-10/100, ImageNet). Evaluation adds top-5 and
calibration to the per-tick accuracy, and attention gifs of a few eval images.

Dimension glossary: B batch, T ticks, C classes.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import compiling
from ctm_jax import evaluators
from ctm_jax import losses
from ctm_jax.analysis import plots
from ctm_jax.data import images as image_data
from ctm_jax.data import tfds_images
from ctm_jax.models import ff as ff_model
from ctm_jax.models import lstm as lstm_model
from ctm_jax.tasks import base

# tasks/image_classification/train.py: len(class_labels) of each dataset.
REFERENCE_CLASSES = {'cifar10': 10, 'cifar100': 100, 'imagenet': 1000}
# The reference's dataset names -> ours (its ImageNet is imagenet2012's images).
_REFERENCE_DATASETS = {'cifar10': 'cifar10', 'cifar100': 'cifar100', 'imagenet': 'imagenet2012'}


def picture_settings(config) -> tuple[str, tuple[int, int, int]]:
  """(dataset, image_shape) a picture is preprocessed for: a training run's
  config says; an import's saved args name the dataset (none, with 1000
  classes: the released ImageNet checkpoint), whose default shape is taken."""
  if 'dataset' in config:
    return config.dataset, tuple(config.image_shape)
  args = config.get('reference_args') or {}
  dataset = _REFERENCE_DATASETS.get(args.get('dataset'))
  if dataset is None and config.model_kwargs.out_dims == REFERENCE_CLASSES['imagenet']:
    dataset = 'imagenet2012'
  if dataset is None:
    raise ValueError(
        f'the imported model\'s args name no dataset we preprocess for (dataset='
        f'{args.get("dataset")!r}); give a .npy of one model-ready image'
    )
  return dataset, tfds_images.SPECS[dataset].image_shape


def image_classification_loss(
    predictions_BxCxT, certainties_Bx2xT, targets_B, use_most_certain: bool = True
):
  """Loss for classification (images, Q&A-MNIST); returns (loss, most_certain_B)."""
  loss_BxT = losses.per_tick_cross_entropy(predictions_BxCxT, targets_B)
  return losses.select_ticks(loss_BxT, certainties_Bx2xT, use_most_certain)


@base.register
class ImageClassification(base.Task, base.Supervised, base.Predicts, base.ImportsReference):
  name = 'image_classification'
  config_keys = frozenset(
      {'dataset', 'num_classes', 'image_shape', 'dataset_size', 'data_dir', 'augment',
       'n_attention_gifs'}
  )
  identity_keys = ('num_classes', 'image_shape')
  baselines = {'lstm': lstm_model.LSTMBaseline, 'ff': ff_model.FFBaseline}

  def validate(self, config):
    image_data.check_config(config)
    gifs = config.n_attention_gifs
    if not isinstance(gifs, int) or isinstance(gifs, bool) or gifs < 0:
      raise ValueError(f'config.n_attention_gifs={gifs!r}: must be a non-negative integer')

  def check_data(self, config):
    image_data.check_data(config)

  def record_spec(self, config):
    return image_data.record_spec(config)

  def train_source(self, config):
    return image_data.train_source(config)

  def eval_source(self, config):
    return image_data.eval_source(config)

  def train_transform(self, config):
    return image_data.train_transform(config)

  def synthetic_batch(self, config, batch_size, seed):
    rng = np.random.default_rng(seed)
    return {
        'inputs': rng.standard_normal((batch_size, *config.image_shape), dtype=np.float32),
        'targets': rng.integers(0, config.num_classes, (batch_size,)).astype(np.int32),
    }

  def model_kwargs(self, config):
    return {**config.model.to_dict(), 'out_dims': config.num_classes, 'prediction_reshaper': (-1,)}

  def loss(self, config, output, batch):
    loss, most_certain_B = image_classification_loss(
        output.predictions, output.certainties, batch['targets'], config.use_most_certain
    )
    return loss, {'most_certain_B': most_certain_B}

  def correct(self, output, batch):
    """Whether each tick's top class is the label, (B, T)."""
    predictions_BxCxT = output.predictions
    return (jnp.argmax(predictions_BxCxT, axis=1) == batch['targets'][:, None]).astype(jnp.float32)

  def eval_arrays(self, config, output, batch, aux):
    """Adds top-5 hits and the top class's probability per tick, (B, T) each."""
    arrays = super().eval_arrays(config, output, batch, aux)
    logits_BxCxT = output.predictions.astype(jnp.float32)
    label_logit_BxT = jnp.take_along_axis(logits_BxCxT, batch['targets'][:, None, None], axis=1)[
        :, 0
    ]
    # Ties count against the label, as in analysis.metrics.top_k_correct.
    above_BxT = (logits_BxCxT >= label_logit_BxT[:, None]).sum(axis=1) - 1
    arrays['top5_BxT'] = (above_BxT < min(5, logits_BxCxT.shape[1])).astype(jnp.float32)
    arrays['confidence_BxT'] = jax.nn.softmax(logits_BxCxT, axis=1).max(axis=1)
    return arrays

  evals = {
      **base.Supervised.evals,
      'top5': lambda context: evaluators.TopK(context, 'top5_BxT', 'top5'),
      'calibration': evaluators.Calibration,
      'attention_gifs': lambda context: (
          evaluators.AttentionGifs(context, context.config.n_attention_gifs)
          if context.config.n_attention_gifs else None
      ),
  }
  default_evals = ('tick_accuracy', 'top5', 'calibration', 'adaptive_compute', 'attention_gifs')

  def read_input(self, config, source):
    if source.lower().endswith('.npy'):
      return super().read_input(config, source)
    dataset, image_shape = picture_settings(config)
    return {'inputs': image_data.read_image_file(source, dataset, image_shape)[None]}

  def describe(self, config, prediction_O):
    probs_O = np.exp(prediction_O - prediction_O.max())
    probs_O /= probs_O.sum()
    top = int(np.argmax(probs_O))
    return f'class {top} (p {probs_O[top]:.3f})'

  def prediction_gif(self, config, model, variables, batch, path):
    images = batch['inputs']
    num_top = min(5, model.out_dims)
    tracked = jax.device_get(compiling.jit(evaluators.attention_arrays, static_argnums=(0, 3))(
        model, variables, images, num_top))
    grid = evaluators.feature_grid(model, images.shape[1:])
    targets = batch.get('targets')
    return plots.attention_gif(
        images[0],
        tracked['attention_BxTxN'][0].reshape(-1, *grid),
        tracked['top_probs_BxTxA'][0],
        tracked['top_classes_BxTxA'][0],
        tracked['certainty_BxT'][0],
        path,
        label=None if targets is None else int(targets[0]),
        title=f'{os.path.basename(path)}: ',
    )

  def matches_reference_args(self, args):
    if 'dataset' in args:
      return args['dataset'] in REFERENCE_CLASSES
    # The released ImageNet checkpoint saves no dataset: 1000 classes from a
    # ResNet backbone can only be ImageNet classification.
    out_dims = args.get('out_dims')
    return out_dims == REFERENCE_CLASSES['imagenet'] and str(
        args.get('backbone_type', '')
    ).startswith('resnet')

  def matches_model_kwargs(self, kwargs):
    # A ResNet's features to one flat class vector (mazes reshape to routes).
    reshaper = list(kwargs.get('prediction_reshaper') or [-1])
    return str(kwargs.get('backbone_type', '')).startswith('resnet') and reshaper == [-1]

  def reference_model_kwargs(self, args):
    dataset = args.get('dataset')
    if dataset in REFERENCE_CLASSES:
      out_dims = REFERENCE_CLASSES[dataset]
    elif args.get('out_dims') is not None:  # another dataset (a --task override)
      out_dims = int(args['out_dims'])
    else:
      raise ValueError(
          f'saved args: dataset={dataset!r} has no known class count '
          f'({sorted(REFERENCE_CLASSES)}) and there is no out_dims'
      )
    return {'out_dims': out_dims, 'prediction_reshaper': [-1], 'dropout_nlm': args.get('dropout_nlm')}
