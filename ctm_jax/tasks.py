"""Tasks: what the trainer needs to know about a dataset and its loss.

A task turns the config into model kwargs (the reference derives `out_dims` and
`prediction_reshaper` from the data), builds data sources, computes the loss
and the metrics of a batch.

Dimension glossary: B batch, T ticks, L parity sequence length, O out_dims,
C classes.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import losses
from ctm_jax.data import images as image_data
from ctm_jax.data import parity as parity_data


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  model_kwargs: Callable[[Any], dict]
  example_input: Callable[[Any], jax.Array]
  train_source: Callable[[Any], Any]
  eval_source: Callable[[Any], Any]
  # config -> {leaf: (shape, dtype)} of one model-ready example, without reading data.
  record_spec: Callable[[Any], dict]
  loss: Callable[..., tuple]  # (output, batch, use_most_certain) -> (loss, most_certain_B)
  correct: Callable[..., jax.Array]  # (output, batch) -> per-tick accuracy (B, T)
  config_keys: frozenset = frozenset()  # top-level config keys of this task
  # Checks the task's own keys (raising ValueError naming `config.<key>=...`)
  # before anything is built; None when the other hooks' checks suffice.
  validate: Callable[[Any], None] | None = None
  # config -> (record, rng) -> train example, run per record in the data
  # pipeline (augmentation); None when train records are model-ready.
  train_transform: Callable[[Any], Callable | None] = lambda config: None
  # Raises ValueError, saying how to fix it, when the task's data cannot be read.
  check_data: Callable[[Any], None] = lambda config: None
  # (output, batch) -> per-example per-tick eval arrays beyond `correct`, computed
  # on device (classification: `top5_BxT`, `confidence_BxT`); None when there are none.
  eval_details: Callable[..., dict] | None = None


def _parity_model_kwargs(config) -> dict:
  length = config.parity_sequence_length
  kwargs = config.model.to_dict()
  kwargs.update(out_dims=2 * length, prediction_reshaper=(length, 2))
  return kwargs


def _parity_loss(output, batch, use_most_certain):
  return losses.parity_loss(
      output.predictions, output.certainties, batch['targets'], use_most_certain
  )


def _parity_correct(output, batch):
  """Per-bit accuracy of every tick, (B, T)."""
  batch_size, _, ticks = output.predictions.shape
  logits_BxLx2xT = output.predictions.reshape(batch_size, -1, 2, ticks)
  hits_BxLxT = jnp.argmax(logits_BxLx2xT, axis=2) == batch['targets'][..., None]
  return hits_BxLxT.mean(axis=1)


PARITY = Task(
    name='parity',
    model_kwargs=_parity_model_kwargs,
    example_input=lambda config: jnp.ones((1, config.parity_sequence_length), jnp.float32),
    train_source=lambda config: parity_data.train_source(
        config.parity_sequence_length, config.seed
    ),
    eval_source=lambda config: parity_data.eval_source(config.parity_sequence_length, config.seed),
    loss=_parity_loss,
    correct=_parity_correct,
    config_keys=frozenset({'parity_sequence_length'}),
    record_spec=lambda config: {
        'inputs': ((config.parity_sequence_length,), np.dtype(np.float32)),
        'targets': ((config.parity_sequence_length,), np.dtype(np.int32)),
    },
)


def _image_model_kwargs(config) -> dict:
  kwargs = config.model.to_dict()
  kwargs.update(out_dims=config.num_classes, prediction_reshaper=(-1,))
  return kwargs


def _image_loss(output, batch, use_most_certain):
  return losses.image_classification_loss(
      output.predictions, output.certainties, batch['targets'], use_most_certain
  )


def _image_correct(output, batch):
  """Whether each tick's top class is the label, (B, T)."""
  predictions_BxCxT = output.predictions
  return (jnp.argmax(predictions_BxCxT, axis=1) == batch['targets'][:, None]).astype(jnp.float32)


def _image_eval_details(output, batch):
  """Top-5 hits and top-class probability per tick, (B, T) each, without the (B, C, T) logits."""
  logits_BxCxT = output.predictions.astype(jnp.float32)
  label_logit_BxT = jnp.take_along_axis(logits_BxCxT, batch['targets'][:, None, None], axis=1)[:, 0]
  # Ties count against the label, as in analysis.metrics.top_k_correct.
  above_BxT = (logits_BxCxT >= label_logit_BxT[:, None]).sum(axis=1) - 1
  top5_BxT = (above_BxT < min(5, logits_BxCxT.shape[1])).astype(jnp.float32)
  confidence_BxT = jax.nn.softmax(logits_BxCxT, axis=1).max(axis=1)
  return {'top5_BxT': top5_BxT, 'confidence_BxT': confidence_BxT}


IMAGE_CLASSIFICATION = Task(
    name='image_classification',
    model_kwargs=_image_model_kwargs,
    example_input=lambda config: jnp.ones((1, *config.image_shape), jnp.float32),
    train_source=image_data.train_source,
    eval_source=image_data.eval_source,
    loss=_image_loss,
    correct=_image_correct,
    config_keys=frozenset(
        {'dataset', 'num_classes', 'image_shape', 'dataset_size', 'data_dir', 'augment'}
    ),
    validate=image_data.check_config,
    train_transform=image_data.train_transform,
    check_data=image_data.check_data,
    record_spec=image_data.record_spec,
    eval_details=_image_eval_details,
)

TASKS = {'parity': PARITY, 'image_classification': IMAGE_CLASSIFICATION}


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f'config.task={name!r} is unknown; expected one of {sorted(TASKS)}')
  return TASKS[name]
