"""Brackets (the community's CTM task): is a sequence over ( ) [ ] well nested?

Inputs (B, W, V): the sequence one-hot, PAD after it (ctm_jax/data/brackets.py
defines the data); targets (B,): 1 valid, 0 invalid. The model attends over
the W positions as parity's does (embedded tokens with the 1-D rotational
positional embedding: ctm_jax/models/tokens.py) and answers two classes at every tick. Evaluation
adds length generalisation: the same metrics on sequences longer than any
trained on (`eval/long_acc_*`), accuracy per kind of near miss (`eval/acc_most_certain_swap`, ...),
and a gif per eval sequence.

Dimension glossary: B batch, T ticks, W padded width, V vocabulary.
"""

import os

import jax
import jax.numpy as jnp
from matplotlib import patheffects
import numpy as np

from ctm_jax import compiling
from ctm_jax import evaluators
from ctm_jax import sharding
from ctm_jax.analysis import evaluation
from ctm_jax.analysis import plots
from ctm_jax.data import brackets as brackets_data
from ctm_jax.data import pipeline
from ctm_jax.models import tokens as tokens_model
from ctm_jax.tasks import base
from ctm_jax.tasks import image

ANSWERS = ('invalid', 'valid')


def _positive_int(config, key):
  value = config.get(key)
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f'config.{key}={value!r}: must be a positive integer')
  return value


def accuracy_by_kind(per_example, name: str) -> dict[str, float]:
  """`eval/<name>_most_certain_<kind>`: held-out accuracy at the most certain
  tick of valid sequences and of each kind of near miss (data/brackets.py's
  KINDS), which says what the model has and has not learnt to read."""
  correct_N = evaluation.at_ticks(np.asarray(per_example['correct_BxT']), np.asarray(per_example['most_certain_B']))
  kind_N = np.asarray(per_example['kind_B'])
  return {
      f'eval/{name}_most_certain_{kind}': float(correct_N[kind_N == k].mean())
      for k, kind in enumerate(brackets_data.KINDS)
      if (kind_N == k).any()
  }


class AccuracyByKind:
  """Held-out accuracy at the most certain tick per kind of sequence
  (`eval/acc_most_certain_valid`, `..._swap`, `..._mistype`, ...)."""

  def __init__(self, context):
    self.context = context

  def run(self, state, step: int) -> dict[str, float]:
    return accuracy_by_kind(self.context.held_out(state, step)[0], 'acc')


class LongSequences:
  """Length generalisation: the held-out metrics on `n_test_batches` batches of
  sequences longer than any trained on (data/brackets.py's 'long' split),
  `eval/long_acc_most_certain` beside the main `eval/acc_most_certain`."""

  def __init__(self, context):
    config = context.config
    self.context = context
    self.batches = pipeline.make_eval_batches(
        brackets_data.long_source(config),
        batch_size=config.batch_size_test // jax.process_count(),
        num_batches=config.n_test_batches,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )

  def run(self, state, step: int) -> dict[str, float]:
    run = self.context.run
    per_batch = [run.eval_step(state, sharding.global_batch(b, run.mesh))[1] for b in self.batches]
    per_example = evaluation.concatenate(jax.device_get(per_batch))
    return {
        **evaluation.per_tick(per_example['correct_BxT'], per_example['most_certain_B'], 'eval', 'long_acc'),
        **accuracy_by_kind(per_example, 'long_acc'),
    }


def tracked_arrays(model, variables, inputs_BxWxV) -> dict[str, jax.Array]:
  """What a sequence gif draws: P(valid) `p_valid_BxT`, `certainty_BxT` and
  head-averaged attention `attention_BxTxW`."""
  output = model.apply(variables, inputs_BxWxV, track=True)
  probs_BxCxT = jax.nn.softmax(output.predictions.astype(jnp.float32), axis=1)
  return {
      'p_valid_BxT': probs_BxCxT[:, 1],
      'certainty_BxT': output.certainties[:, 1].astype(jnp.float32),
      'attention_BxTxW': evaluators.head_mean_attention(output),
  }


class SequenceGifs(evaluators.RecordGifs):
  """`sequence_<step>_<i>.gif` for the first `count` held-out sequences: per
  tick, the attention over the brackets, P(valid) and the certainty."""

  def __init__(self, context, count: int):
    super().__init__(context, count, evaluators.tracked_step(tracked_arrays))

  def draw(self, index, record, tracked, step):
    sequence_gif(
        record['tokens'],
        tracked['attention_BxTxW'],
        tracked['p_valid_BxT'],
        tracked['certainty_BxT'],
        os.path.join(self.context.plot_dir, f'sequence_{step:07d}_{index}.gif'),
        answer=int(record['targets']),
        title=f'step {step}, eval sequence {index}: ',
    )


@base.register
class Brackets(base.Task, base.Supervised, base.Predicts):
  name = 'brackets'
  config_keys = frozenset(
      {'brackets_min_length', 'brackets_max_length', 'brackets_long_max_length', 'n_sequence_gifs'}
  )
  # The padded width: the positions the model attends over.
  identity_keys = ('brackets_long_max_length',)
  model_class = tokens_model.ContinuousThoughtMachineTokens
  baselines = {'lstm': tokens_model.LSTMTokens}

  def validate(self, config):
    low = _positive_int(config, 'brackets_min_length')
    high = _positive_int(config, 'brackets_max_length')
    width = _positive_int(config, 'brackets_long_max_length')
    if low > high or high < 2:
      raise ValueError(
          f'config.brackets_max_length={high}: must be >= 2 and >= config.brackets_min_length={low}'
      )
    if width <= high:
      raise ValueError(
          f'config.brackets_long_max_length={width}: must exceed config.brackets_max_length={high} '
          '(the long sequences the model is tested on for length generalisation)'
      )
    try:
      brackets_data.check_lengths(low, high, width)
    except ValueError as e:
      raise ValueError(f'config.brackets_min_length={low}: {e}') from None
    gifs = config.get('n_sequence_gifs')
    if not isinstance(gifs, int) or isinstance(gifs, bool) or gifs < 0:
      raise ValueError(f'config.n_sequence_gifs={gifs!r}: must be a non-negative integer')

  def record_spec(self, config):
    width = brackets_data.width(config)
    return {
        'tokens': ((width,), np.dtype(np.int32)),
        'inputs': ((width, brackets_data.VOCAB), np.dtype(np.float32)),
        'targets': ((), np.dtype(np.int32)),
        'length': ((), np.dtype(np.int32)),
        'kind': ((), np.dtype(np.int32)),
    }

  def train_source(self, config):
    return brackets_data.train_source(config)

  def eval_source(self, config):
    return brackets_data.eval_source(config)

  def synthetic_batch(self, config, batch_size, seed):
    source = brackets_data.BracketsSource(
        config.brackets_min_length, config.brackets_max_length, brackets_data.width(config), seed,
        batch_size, 'train',
    )
    return {k: np.stack([source[i][k] for i in range(batch_size)]) for k in self.record_spec(config)}

  def model_kwargs(self, config):
    return {**config.model.to_dict(), 'out_dims': 2, 'prediction_reshaper': (-1,)}

  def loss(self, config, output, batch):
    loss, most_certain_B = image.image_classification_loss(
        output.predictions, output.certainties, batch['targets'], config.use_most_certain
    )
    return loss, {'most_certain_B': most_certain_B}

  def correct(self, output, batch):
    return (jnp.argmax(output.predictions, axis=1) == batch['targets'][:, None]).astype(jnp.float32)

  def eval_arrays(self, config, output, batch, aux):
    return {**super().eval_arrays(config, output, batch, aux), 'kind_B': batch['kind']}

  evals = {
      **base.Supervised.evals,
      'long': LongSequences,
      'by_kind': AccuracyByKind,
      'sequence_gifs': lambda context: (
          SequenceGifs(context, context.config.n_sequence_gifs) if context.config.n_sequence_gifs else None
      ),
  }
  default_evals = ('tick_accuracy', 'by_kind', 'long', 'adaptive_compute', 'sequence_gifs')

  def read_input(self, config, source):
    """A file of, or the text of, one sequence of brackets: '(()[])'."""
    if source.lower().endswith('.npy'):
      return super().read_input(config, source)
    if 'brackets_long_max_length' not in config:  # an import records no padded width
      raise ValueError(f'--input={source}: an imported brackets model records no padded width to read text '
                       f'at; give a .npy of the one-hot sequence (W, {brackets_data.VOCAB}) at its width')
    text = ''.join(base.text_input(source).split())
    width = int(config.brackets_long_max_length)
    try:
      tokens = brackets_data.from_text(text)
    except ValueError as e:
      raise ValueError(f'--input={source}: {e}') from None
    if not 1 <= len(tokens) <= width:
      raise ValueError(f'--input={source}: {len(tokens)} brackets; the model reads 1 to {width}')
    record = brackets_data.record(tokens, width)
    return {k: record[k][None] for k in ('inputs', 'targets')}

  def describe(self, config, prediction_O):
    probs_O = np.exp(prediction_O - prediction_O.max())
    probs_O /= probs_O.sum()
    top = int(np.argmax(probs_O))
    return f'{ANSWERS[top]} (p {probs_O[top]:.3f})'

  def prediction_gif(self, config, model, variables, batch, path):
    inputs = np.asarray(batch['inputs'])
    arrays = jax.device_get(compiling.jit(tracked_arrays, static_argnums=0)(model, variables, inputs))
    targets = batch.get('targets')
    return sequence_gif(
        inputs[0].argmax(-1),
        arrays['attention_BxTxW'][0],
        arrays['p_valid_BxT'][0],
        arrays['certainty_BxT'][0],
        path,
        answer=None if targets is None else int(np.asarray(targets).reshape(-1)[0]),
        title=f'{os.path.basename(path)}: ',
    )


# ---------------------------------------------------------------------------
# The task's picture.


def sequence_gif(tokens_W, attention_TxW, p_valid_T, certainty_T, path, answer=None, title='',
                 frame_ms: int = 200) -> str:
  """One frame per tick: the brackets in a row under the head-averaged
  attention (padding greyed), P(valid) so far, and the certainty curve with
  this tick marked; the heading gives the answer and whether it is right."""
  tokens_W = np.asarray(tokens_W)
  length = int((tokens_W != brackets_data.PAD).sum())
  width, ticks = len(tokens_W), len(p_valid_T)
  fig, (ax_seq, ax_curve) = plots.subplots(2, 1, figsize=(max(6.0, 0.3 * width), 3.9), dpi=80,
                                           gridspec_kw={'height_ratios': [1, 1.4]})
  overlay = ax_seq.imshow(np.zeros((1, width)), cmap='inferno', aspect='auto', vmin=0, vmax=1)
  for i, token in enumerate(tokens_W):
    ax_seq.text(i, 0, brackets_data.SYMBOLS[int(token)], ha='center', va='center', fontsize=13,
                fontweight='bold', color='white' if token != brackets_data.PAD else 'grey',
                path_effects=[patheffects.withStroke(linewidth=2, foreground='black')])
  ax_seq.set_yticks([])
  ax_seq.set_xticks([])
  ax_seq.set_title(f'{length} brackets, attention per position', fontsize=8)
  steps_T = np.arange(1, ticks + 1)
  ax_curve.plot(steps_T, certainty_T, color='tab:blue', label='certainty')
  (p_line,) = ax_curve.plot([], [], color='tab:green', label='P(valid)')
  marker = ax_curve.axvline(1, color='black', linewidth=0.8)
  ax_curve.set_xlim(1, max(ticks, 2))
  ax_curve.set_ylim(0, 1.02)
  ax_curve.set_xlabel('tick', fontsize=8)
  ax_curve.legend(fontsize=7, loc='lower right')
  heading = fig.suptitle('', fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.86))
  frames = []
  for t in range(ticks):
    row_W = np.asarray(attention_TxW[t], np.float64)
    overlay.set_data(row_W[None])
    overlay.set_clim(float(row_W.min()), float(row_W.max()) + 1e-9)
    p_line.set_data(steps_T[: t + 1], p_valid_T[: t + 1])
    marker.set_xdata([t + 1, t + 1])
    said = int(p_valid_T[t] >= 0.5)
    verdict = '' if answer is None else (', right' if said == answer else ', wrong')
    heading.set_text(
        f'{title}tick {t + 1}/{ticks}\n{ANSWERS[said]} (P(valid) {float(p_valid_T[t]):.2f}), '
        f'certainty {float(certainty_T[t]):.2f}{verdict}'
    )
    frames.append(plots.frame(fig))
  return plots.save_gif(frames, path, frame_ms)
