"""Pure train and eval steps.

Dimension glossary: B batch, T ticks, N attended positions (h * w of an image
backbone's feature map), A top classes shown.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ctm_jax.models import ctm as ctm_lib


class TrainState(flax.struct.PyTreeNode):
  """Everything a resumed run needs besides the data iterator."""

  step: jax.Array
  params: Any
  opt_state: Any
  batch_stats: Any
  synch: Any  # neuron-pair indices: fixed at init, never optimised
  rng: jax.Array


def init_state(model, tx, rng, example_x) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init(init_rng, example_x)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      batch_stats=variables.get('batch_stats', {}),
      synch=variables['synch'],
      rng=jax.random.key_data(state_rng),
  )


def _variables(state, params):
  variables = {'params': params, 'synch': state.synch}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return variables


def _tick_metrics(task, output, batch, loss, most_certain_B):
  """Sums over the batch (the host divides by the count)."""
  correct_BxT = task.correct(output, batch)
  rows = jnp.arange(correct_BxT.shape[0])
  return {
      'loss_sum': loss * correct_BxT.shape[0],
      'acc_tick_sum': correct_BxT.sum(0),
      'acc_most_certain_sum': correct_BxT[rows, most_certain_B].sum(),
      'acc_last_sum': correct_BxT[:, -1].sum(),
      'most_certain_tick_sum': most_certain_B.sum().astype(jnp.float32),
      'count': jnp.asarray(correct_BxT.shape[0], jnp.float32),
  }


def make_train_step(model, task, tx, schedule, use_most_certain: bool):
  """(state, batch) -> (state, metrics). A non-finite loss or gradient leaves
  the state unchanged (and is reported in the metrics) so that no bad update
  reaches a checkpoint."""

  def train_step(state: TrainState, batch):
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      output, updates = model.apply(
          _variables(state, params),
          batch['inputs'],
          train=True,
          rngs={'dropout': dropout_rng},
          mutable=['batch_stats'],
      )
      loss, most_certain_B = task.loss(output, batch, use_most_certain)
      return loss, (output, updates, most_certain_B)

    (loss, (output, updates, most_certain_B)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    deltas, opt_state = tx.update(grads, state.opt_state, state.params)
    params = ctm_lib.project_decay_params(optax.apply_updates(state.params, deltas))
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        batch_stats=updates.get('batch_stats', state.batch_stats),
    )
    # Keep the last good state when the step blew up.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = _tick_metrics(task, output, batch, loss, most_certain_B)
    metrics.update(grad_norm=grad_norm, lr=schedule(state.step), finite=finite, loss=loss)
    return new_state, metrics

  return train_step


def make_eval_step(model, task, use_most_certain: bool):
  """(state, batch) -> (loss sums, per-example arrays).

  The per-example arrays (`correct_BxT`, `certainty_BxT`, `most_certain_B` and
  the task's `eval_details`) are what the host computes every eval metric
  from, over the whole eval set (ctm_jax/analysis/evaluation.py); they are
  (B, T) at most, never logits. Only the loss is summed here.
  """

  def eval_step(state: TrainState, batch):
    output = model.apply(_variables(state, state.params), batch['inputs'])
    loss, most_certain_B = task.loss(output, batch, use_most_certain)
    per_example = {
        'correct_BxT': task.correct(output, batch).astype(jnp.float32),
        'certainty_BxT': output.certainties[:, 1].astype(jnp.float32),
        'most_certain_B': most_certain_B.astype(jnp.int32),
    }
    if task.eval_details is not None:
      per_example.update(task.eval_details(output, batch))
    count = most_certain_B.shape[0]
    sums = {'loss_sum': loss * count, 'count': jnp.asarray(count, jnp.float32)}
    return sums, per_example

  return eval_step


def make_attention_step(model, num_top: int):
  """(state, images) -> per-tick attention maps and top classes of a few images.

  Returns `attention_BxTxN` (averaged over heads), `top_probs_BxTxA`,
  `top_classes_BxTxA` (the A = `num_top` most probable classes) and `certainty_BxT`.
  """

  def attention_step(state: TrainState, images):
    output = model.apply(_variables(state, state.params), images, track=True)
    attention_TxBxN = output.tracking.attention.astype(jnp.float32).mean(axis=(2, 3))
    probs_BxTxC = jax.nn.softmax(
        jnp.moveaxis(output.predictions.astype(jnp.float32), 1, 2), axis=-1
    )
    top_probs_BxTxA, top_classes_BxTxA = jax.lax.top_k(probs_BxTxC, num_top)
    return {
        'attention_BxTxN': jnp.moveaxis(attention_TxBxN, 0, 1),
        'top_probs_BxTxA': top_probs_BxTxA,
        'top_classes_BxTxA': top_classes_BxTxA,
        'certainty_BxT': output.certainties[:, 1].astype(jnp.float32),
    }

  return attention_step


def feature_grid(model, image_shape) -> tuple[int, int]:
  """(h, w) of the feature map the model attends over for images of `image_shape`.

  Read from the backbone's output shape (abstractly: nothing is computed); the
  input itself when the model has no backbone.
  """

  def is_backbone_call(module, method):
    return module.name == 'backbone' and method == '__call__'

  def backbone_output(x):
    _, variables = model.init_with_output(
        jax.random.key(0), x, capture_intermediates=is_backbone_call
    )
    return variables.get('intermediates', {})

  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  captured = jax.tree.leaves(jax.eval_shape(backbone_output, x))
  shape = captured[0].shape if captured else x.shape
  if len(shape) != 4:
    raise ValueError(f'the backbone maps images {image_shape} to {shape[1:]}, not a 2-D map')
  return shape[1], shape[2]
