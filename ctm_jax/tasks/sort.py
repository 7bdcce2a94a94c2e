"""Sorting real numbers (the reference's tasks/sort): the output is a sequence.

Inputs (B, N) standard-normal numbers, targets (B, N) the permutation that
sorts them. The model answers one of N + 1 symbols per tick (a position, or
the CTC blank, last); read over the ticks and decoded greedily, the symbols
spell the permutation. Trained with CTC (`optax.ctc_loss`, the reference's
`sort_loss`), scored by per-position and whole-sequence accuracy of the
decoded sequence, as the reference's train script does.

Dimension glossary: B batch, T ticks, N numbers to sort, C = N + 1 symbols.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from ctm_jax.analysis import plots
from ctm_jax.data import sort as sort_data
from ctm_jax.models import sort as sort_model
from ctm_jax.tasks import base


def sort_loss(predictions_BxCxT, targets_BxN):
  """CTC of the per-tick symbols against the sorting permutation, blank last:
  torch's CTCLoss(reduction='mean'), each sequence's loss divided by its
  length, then the batch mean."""
  logits_BxTxC = jnp.moveaxis(predictions_BxCxT.astype(jnp.float32), 1, 2)
  batch, ticks, symbols = logits_BxTxC.shape
  nll_B = optax.ctc_loss(
      logits_BxTxC,
      jnp.zeros((batch, ticks)),
      targets_BxN,
      jnp.zeros(targets_BxN.shape),
      blank_id=symbols - 1,
  )
  return jnp.mean(nll_B / targets_BxN.shape[1])


def greedy_decode(predictions_BxCxT, length: int):
  """The reference's best-path decoding of every example.

  A tick's most probable symbol is emitted when it is not the blank and differs
  from the last symbol emitted (as the reference decodes, a blank between two
  equal symbols does not separate them). Returns `decoded_BxN` (the first
  `length` symbols emitted, padded with `length`), `emitted_at_BxN` (the tick
  of each, T where none) and `count_B` (symbols emitted in all).
  """
  batch, symbols, ticks = predictions_BxCxT.shape
  blank = symbols - 1
  best_TxB = jnp.argmax(predictions_BxCxT, axis=1).T

  def step(last_B, symbol_B):
    emit_B = (symbol_B != blank) & (symbol_B != last_B)
    return jnp.where(emit_B, symbol_B, last_B), emit_B

  _, emit_TxB = jax.lax.scan(step, jnp.full((batch,), -1, best_TxB.dtype), best_TxB)
  emit_BxT = emit_TxB.T
  position_BxT = jnp.cumsum(emit_BxT, axis=1) - 1
  # Emissions past `length` (and ticks that emit nothing) write out of range: dropped.
  slot_BxT = jnp.where(emit_BxT & (position_BxT < length), position_BxT, length)
  rows_BxT = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, ticks))
  decoded_BxN = jnp.full((batch, length), length, jnp.int32)
  decoded_BxN = decoded_BxN.at[rows_BxT, slot_BxT].set(best_TxB.T.astype(jnp.int32), mode='drop')
  ticks_BxT = jnp.broadcast_to(jnp.arange(ticks, dtype=jnp.int32), (batch, ticks))
  emitted_at_BxN = jnp.full((batch, length), ticks, jnp.int32)
  emitted_at_BxN = emitted_at_BxN.at[rows_BxT, slot_BxT].set(ticks_BxT, mode='drop')
  return decoded_BxN, emitted_at_BxN, emit_BxT.sum(axis=1)


def sort_scores(predictions_BxCxT, targets_BxN):
  """(correct_BxT, exact_B): the fraction of positions decoded right by each
  tick (so the last tick is the reference's per-position accuracy), and
  whether the whole decoded sequence is the permutation (no more, no fewer)."""
  length = targets_BxN.shape[1]
  decoded_BxN, emitted_at_BxN, count_B = greedy_decode(predictions_BxCxT, length)
  right_BxN = decoded_BxN == targets_BxN
  ticks_T = jnp.arange(predictions_BxCxT.shape[-1])
  by_tick_BxNxT = right_BxN[..., None] & (emitted_at_BxN[..., None] <= ticks_T)
  exact_B = (count_B == length) & right_BxN.all(axis=1)
  return by_tick_BxNxT.mean(axis=1).astype(jnp.float32), exact_B.astype(jnp.float32)


class SortAccuracy:
  """`eval/loss`, `eval/acc_position` (the decoded sequence, position by
  position) and `eval/acc_sequence` (whole sequences right), and a plot of the
  positions decoded right by each tick (`eval_ticks_<step>.png`)."""

  def __init__(self, context):
    self.context = context

  def run(self, state, step: int) -> dict[str, float]:
    ctx = self.context
    per_example, loss = ctx.held_out(state, step)
    correct_NxT = per_example['correct_BxT']
    scalars = {
        'eval/loss': loss,
        'eval/acc_position': float(correct_NxT[:, -1].mean()),
        'eval/acc_sequence': float(per_example['exact_B'].mean()),
        # Wall time of this process so far, compile included (time-to-accuracy).
        'eval/elapsed_s': time.perf_counter() - ctx.started,
    }
    if ctx.is_chief:
      plots.plot_ticks(
          correct_NxT.mean(axis=0),
          per_example['certainty_BxT'].mean(axis=0),
          os.path.join(ctx.plot_dir, f'eval_ticks_{step:07d}.png'),
          title=f'{ctx.title}: eval at step {step}',
          label='positions decoded right by this tick',
      )
    logging.info(
        'eval step %d: loss %.4f, per-position %.4f, whole sequence %.4f',
        step, loss, scalars['eval/acc_position'], scalars['eval/acc_sequence'],
    )
    return scalars


@base.register
class Sort(base.Task, base.Supervised, base.Predicts, base.ImportsReference):
  name = 'sort'
  config_keys = frozenset({'N_to_sort'})
  identity_keys = ('N_to_sort',)
  model_class = sort_model.ContinuousThoughtMachineSORT
  # tasks/sort/train.py has no --backbone_type: the model has no backbone.
  reference_arg_defaults = {'backbone_type': 'none'}

  def validate(self, config):
    size = config.N_to_sort
    if not isinstance(size, int) or isinstance(size, bool) or size < 2:
      raise ValueError(f'config.N_to_sort={size!r}: must be an integer of at least 2')
    if config.model.iterations < size:
      raise ValueError(
          f'config.model.iterations={config.model.iterations}: CTC needs at least one tick per '
          f'number sorted (N_to_sort={size})'
      )

  def record_spec(self, config):
    size = config.N_to_sort
    return {
        'inputs': ((size,), np.dtype(np.float32)),
        'targets': ((size,), np.dtype(np.int32)),
    }

  def train_source(self, config):
    return sort_data.train_source(config.N_to_sort, config.seed)

  def eval_source(self, config):
    return sort_data.eval_source(config.N_to_sort, config.seed)

  def synthetic_batch(self, config, batch_size, seed):
    rng = np.random.default_rng(seed)
    inputs_BxN = rng.standard_normal((batch_size, config.N_to_sort)).astype(np.float32)
    return {'inputs': inputs_BxN, 'targets': np.argsort(inputs_BxN, axis=1).astype(np.int32)}

  def model_kwargs(self, config):
    size = config.N_to_sort
    # The reference sets d_input to N (the input is concatenated as it is).
    return {**config.model.to_dict(), 'out_dims': size + 1, 'd_input': size, 'prediction_reshaper': (-1,)}

  def loss(self, config, output, batch):
    loss = sort_loss(output.predictions, batch['targets'])
    # No tick is selected (CTC reads them all); the most certain one is reported.
    return loss, {'most_certain_B': jnp.argmax(output.certainties[:, 1], axis=-1)}

  def correct(self, output, batch):
    """The fraction of positions decoded right by each tick, (B, T)."""
    return sort_scores(output.predictions, batch['targets'])[0]

  def train_metrics(self, config, output, batch, loss, aux):
    correct_BxT, exact_B = sort_scores(output.predictions, batch['targets'])
    return {
        'loss_sum': loss * exact_B.shape[0],
        'acc_position_sum': correct_BxT[:, -1].sum(),
        'acc_sequence_sum': exact_B.sum(),
        'count': jnp.asarray(exact_B.shape[0], jnp.float32),
    }

  def eval_arrays(self, config, output, batch, aux):
    correct_BxT, exact_B = sort_scores(output.predictions, batch['targets'])
    return {
        'correct_BxT': correct_BxT,
        'exact_B': exact_B,
        'certainty_BxT': output.certainties[:, 1].astype(jnp.float32),
    }

  # Its eval arrays are positions decoded right, not a tick's class.
  evals = {'sort_accuracy': SortAccuracy}
  default_evals = ('sort_accuracy',)

  def read_input(self, config, source):
    """N numbers: a file of them or the text itself (whitespace or commas)."""
    if source.lower().endswith('.npy'):
      batch = super().read_input(config, source)
    else:
      text = base.text_input(source)
      try:
        values = [float(v) for v in text.replace(',', ' ').split()]
      except ValueError:
        raise ValueError(f'--input={source}: numbers separated by spaces or commas') from None
      batch = {'inputs': np.asarray(values, np.float32)[None]}
    size = sort_size(config)
    if batch['inputs'].shape != (1, size):
      raise ValueError(f'--input={source}: {batch["inputs"].shape[1:]} values; the model sorts {size}')
    batch['targets'] = np.argsort(batch['inputs'], axis=1).astype(np.int32)
    return batch

  def matches_reference_args(self, args):
    return 'N_to_sort' in args

  def matches_model_kwargs(self, kwargs):
    # N numbers in, N positions and the blank out.
    reshaper = list(kwargs.get('prediction_reshaper') or [-1])
    return (kwargs.get('backbone_type') == 'none' and reshaper == [-1]
            and kwargs.get('out_dims') == (kwargs.get('d_input') or 0) + 1)

  def reference_model_kwargs(self, args):
    size = int(base.required_arg(args, 'N_to_sort', self.name))
    return {'out_dims': size + 1, 'd_input': size, 'prediction_reshaper': [-1],
            'dropout_nlm': args.get('dropout_nlm')}

  def describe(self, config, prediction_O):
    symbol = int(np.argmax(prediction_O))
    return 'blank' if symbol == len(prediction_O) - 1 else f'emits position {symbol}'


def sort_size(config) -> int:
  """N of a training run's config or of an import's (its out_dims are N + 1)."""
  if 'N_to_sort' in config:
    return int(config.N_to_sort)
  return int(config.model_kwargs.out_dims) - 1
