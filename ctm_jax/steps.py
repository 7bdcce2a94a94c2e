"""Pure train and eval steps.

Dimension glossary: B batch, T ticks.
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
      'certainty_tick_sum': output.certainties[:, 1].sum(0),
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
  def eval_step(state: TrainState, batch):
    output = model.apply(_variables(state, state.params), batch['inputs'])
    loss, most_certain_B = task.loss(output, batch, use_most_certain)
    return _tick_metrics(task, output, batch, loss, most_certain_B)

  return eval_step
