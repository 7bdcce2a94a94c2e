"""Pure train and eval steps; everything task-specific comes from the task.

Dimension glossary: B batch.
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


def init_state(model, tx, rng, example_inputs) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  initial = model.init(init_rng, example_inputs)
  params = initial['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      batch_stats=initial.get('batch_stats', {}),
      synch=initial.get('synch', {}),  # baselines have no synch indices
      rng=jax.random.key_data(state_rng),
  )


def variables(state, params):
  """The model's variables from a train state, with `params` in place of its own."""
  out = {'params': params}
  if state.synch:
    out['synch'] = state.synch
  if state.batch_stats:
    out['batch_stats'] = state.batch_stats
  return out


def make_train_step(config, model, task, tx, schedule):
  """(state, batch) -> (state, metrics). A non-finite loss or gradient leaves
  the state unchanged (and is reported in the metrics) so that no bad update
  reaches a checkpoint. Metrics: the task's `train_metrics` sums, and
  `grad_norm`, `lr`, `finite`, `loss`."""

  def train_step(state: TrainState, batch):
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      output, updates = model.apply(
          variables(state, params),
          task.model_inputs(batch),
          train=True,
          rngs={'dropout': dropout_rng},
          mutable=['batch_stats'],
      )
      loss, aux = task.loss(config, output, batch)
      return loss, (output, updates, aux)

    (loss, (output, updates, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    deltas, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, deltas)
    if not getattr(model, 'decay_clamp_in_graph', False):
      params = ctm_lib.project_decay_params(params)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        batch_stats=updates.get('batch_stats', state.batch_stats),
    )
    # Keep the last good state when the step blew up.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = task.train_metrics(config, output, batch, loss, aux)
    metrics.update(grad_norm=grad_norm, lr=schedule(state.step), finite=finite, loss=loss)
    return new_state, metrics

  return train_step


def add_sums(total, sums):
  """Accumulates metric-sum pytrees; `total` None starts a new one."""
  return sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)


def make_eval_step(config, model, task):
  """(state, batch) -> (loss sums, per-example arrays).

  The per-example arrays (the task's `eval_arrays`) are what the evaluators
  compute every eval metric from, over the whole eval set (ctm_jax/evaluators.py);
  they are small, never logits. Only the loss is summed here.
  """

  def eval_step(state: TrainState, batch):
    output = model.apply(variables(state, state.params), task.model_inputs(batch))
    loss, aux = task.loss(config, output, batch)
    per_example = task.eval_arrays(config, output, batch, aux)
    count = jax.tree.leaves(per_example)[0].shape[0]
    sums = {'loss_sum': loss * count, 'count': jnp.asarray(count, jnp.float32)}
    return sums, per_example

  return eval_step
