"""Cumulative parity (the reference's tasks/parity): the default task.

Inputs (B, L) of +-1, targets (B, L): the parity of each prefix. The model
answers all L bits at every tick (out_dims 2L, reshaped (L, 2)).

Dimension glossary: B batch, T ticks, L parity sequence length.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import compiling
from ctm_jax import evaluators
from ctm_jax import losses
from ctm_jax.analysis import plots
from ctm_jax.data import parity as parity_data
from ctm_jax.models import lstm as lstm_model
from ctm_jax.tasks import base


def parity_loss(predictions_BxOxT, certainties_Bx2xT, targets_BxL, use_most_certain: bool = True):
  """Cumulative-parity loss; predictions (B, 2L, T) or (B, L, 2, T).

  The cross-entropy is averaged over sequence positions before tick selection.
  """
  batch, ticks = predictions_BxOxT.shape[0], predictions_BxOxT.shape[-1]
  logits_BxLx2xT = predictions_BxOxT.reshape(batch, -1, 2, ticks)
  loss_BxLxT = jax.vmap(losses.per_tick_cross_entropy, in_axes=(1, 1), out_axes=1)(
      logits_BxLx2xT, targets_BxL
  )
  return losses.select_ticks(loss_BxLxT.mean(1), certainties_Bx2xT, use_most_certain)


def sequence_length(config) -> int:
  """L of a training run's config or of an import's (its out_dims are 2L)."""
  if 'parity_sequence_length' in config:
    return int(config.parity_sequence_length)
  return int(config.model_kwargs.out_dims) // 2


def parse_sequence(text: str, source: str) -> np.ndarray:
  """(L,) float32 of +-1 from bits, signs or whitespace/comma-separated values."""
  text = text.strip()
  tokens = text.replace(',', ' ').split()
  values = {'1': 1.0, '+1': 1.0, '-1': -1.0}
  if len(tokens) > 1 and all(t in values for t in tokens):
    return np.array([values[t] for t in tokens], np.float32)
  compact = ''.join(tokens)
  if compact and set(compact) <= set('01'):
    return np.where(np.array(list(compact)) == '1', -1.0, 1.0).astype(np.float32)
  if compact and set(compact) <= set('+-'):
    return np.where(np.array(list(compact)) == '-', -1.0, 1.0).astype(np.float32)
  shown = text if len(text) < 40 else text[:37] + '...'
  raise ValueError(
      f'--input={source}: {shown!r} is not a parity sequence; give bits (0110...), '
      'signs (+--+...) or values (1 -1 -1 ...), or a file of one'
  )


@base.register
class Parity(base.Task, base.Supervised, base.Predicts, base.ImportsReference):
  name = 'parity'
  config_keys = frozenset({'parity_sequence_length'})
  identity_keys = ('parity_sequence_length',)
  baselines = {'lstm': lstm_model.LSTMBaseline}
  reference_model_field = 'model_type'

  def validate(self, config):
    length = config.parity_sequence_length
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
      raise ValueError(f'config.parity_sequence_length={length!r}: must be a positive integer')

  def record_spec(self, config):
    length = config.parity_sequence_length
    return {
        'inputs': ((length,), np.dtype(np.float32)),
        'targets': ((length,), np.dtype(np.int32)),
    }

  def train_source(self, config):
    return parity_data.train_source(config.parity_sequence_length, config.seed)

  def eval_source(self, config):
    return parity_data.eval_source(config.parity_sequence_length, config.seed)

  def synthetic_batch(self, config, batch_size, seed):
    rng = np.random.default_rng(seed)
    inputs_BxL = (2 * rng.integers(0, 2, (batch_size, config.parity_sequence_length)) - 1).astype(
        np.float32
    )
    return {'inputs': inputs_BxL, 'targets': parity_data.parity_targets(inputs_BxL)}

  def model_kwargs(self, config):
    length = config.parity_sequence_length
    return {**config.model.to_dict(), 'out_dims': 2 * length, 'prediction_reshaper': (length, 2)}

  def loss(self, config, output, batch):
    loss, most_certain_B = parity_loss(
        output.predictions, output.certainties, batch['targets'], config.use_most_certain
    )
    return loss, {'most_certain_B': most_certain_B}

  def correct(self, output, batch):
    """Per-bit accuracy of every tick, (B, T)."""
    batch_size, _, ticks = output.predictions.shape
    logits_BxLx2xT = output.predictions.reshape(batch_size, -1, 2, ticks)
    hits_BxLxT = jnp.argmax(logits_BxLx2xT, axis=2) == batch['targets'][..., None]
    return hits_BxLxT.mean(axis=1)

  def read_input(self, config, source):
    """A file of, or the text of, one sequence: bits ('0110...', a 1 flips the
    parity), signs ('+--+...') or the model's values ('1 -1 -1 1 ...')."""
    if source.lower().endswith('.npy'):
      batch = super().read_input(config, source)
    else:
      text = base.text_input(source)
      batch = {'inputs': parse_sequence(text, source)[None]}
    length = sequence_length(config)
    inputs = batch['inputs']
    if inputs.shape != (1, length) or not np.all(np.abs(inputs) == 1):
      raise ValueError(
          f'--input={source}: {inputs.shape[1]} values, not all +-1; the model reads {length} values of +-1'
          if inputs.shape == (1, length) else
          f'--input={source}: {inputs.shape[1:]} values; the model reads {length} values of +-1'
      )
    batch['targets'] = parity_data.parity_targets(inputs)
    return batch

  def describe(self, config, prediction_O):
    bits_L = prediction_O.reshape(-1, 2).argmax(-1)
    return f'parity {bits_L[-1]}, cumulative {"".join(map(str, bits_L))}'

  def prediction_gif(self, config, model, variables, batch, path):
    output = compiling.jit(lambda v, x: model.apply(v, x, track=True))(variables, batch['inputs'])
    predictions_LxT = np.asarray(output.predictions[0]).reshape(-1, 2, output.predictions.shape[-1])
    return parity_gif(
        np.asarray(batch['inputs'][0]),
        np.asarray(evaluators.head_mean_attention(output)[0]),
        predictions_LxT.argmax(1).T,
        np.asarray(batch['targets'][0]),
        np.asarray(output.certainties[0, 1]),
        path,
        title=f'{os.path.basename(path)}: ',
    )

  def matches_reference_args(self, args):
    return 'parity_sequence_length' in args or args.get('dataset') == 'parity'

  def matches_model_kwargs(self, kwargs):
    return kwargs.get('backbone_type') == 'parity_backbone'

  def reference_model_kwargs(self, args):
    length = int(base.required_arg(args, 'parity_sequence_length', self.name))
    # The parity script leaves dropout_nlm at the constructor default (None),
    # and builds its LSTM baseline with one layer whatever its args say.
    kwargs = {'out_dims': 2 * length, 'prediction_reshaper': [length, 2], 'dropout_nlm': None}
    if args.get(self.reference_model_field) == 'lstm':
      kwargs['num_layers'] = 1
    return kwargs


# ---------------------------------------------------------------------------
# The task's picture.


def _grid_shape(length: int) -> tuple[int, int]:
  """(rows, cols) of the most nearly square grid holding `length` cells exactly."""
  rows = max(r for r in range(1, int(np.sqrt(length)) + 1) if length % r == 0)
  return rows, length // rows


def parity_gif(
    inputs_L,
    attention_TxN,
    bits_TxL,
    targets_L,
    certainty_T,
    path,
    title: str = '',
    frame_ms: int = 200,
) -> str:
  """One frame per tick, the sequence laid out row by row: the input (white +1,
  black -1) under the head-averaged attention, and the cumulative parity the
  model answers at that tick (green right, red wrong; a dot marks a 1)."""
  length = len(inputs_L)
  rows, cols = _grid_shape(length)
  fig, (ax_in, ax_out) = plots.subplots(1, 2, figsize=(6, 3.4), dpi=80)
  ax_in.imshow((np.asarray(inputs_L) > 0).reshape(rows, cols), cmap='gray', vmin=0, vmax=1)
  on_grid = np.shape(attention_TxN)[1] == length
  overlay = ax_in.imshow(
      np.asarray(attention_TxN[0]).reshape(rows, cols) if on_grid else np.zeros((rows, cols)),
      cmap='inferno',
      alpha=0.55,
  )
  ys, xs = np.divmod(np.arange(length), cols)
  for y, x, value in zip(ys, xs, np.asarray(inputs_L)):  # the input stays readable under the map
    ax_in.text(x, y, '+' if value > 0 else '-', ha='center', va='center', color='cyan', fontsize=12)
  ax_in.set_title('input (+1 / -1), attention', fontsize=8)
  answer = ax_out.imshow(np.zeros((rows, cols, 3)))
  (dots,) = ax_out.plot([], [], 'o', color='black', markersize=4)
  ax_out.set_title('cumulative parity answered', fontsize=8)
  for ax in (ax_in, ax_out):
    ax.set_axis_off()
  heading = fig.suptitle('', fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.9))
  right_rgb, wrong_rgb = np.array([0.3, 0.75, 0.3]), np.array([0.85, 0.25, 0.25])
  frames = []
  for t in range(len(bits_TxL)):
    if on_grid:
      grid = np.asarray(attention_TxN[t]).reshape(rows, cols)
      overlay.set_data(grid)
      overlay.set_clim(float(grid.min()), float(grid.max()))
    right_L = bits_TxL[t] == targets_L
    answer.set_data(np.where(right_L[:, None], right_rgb, wrong_rgb).reshape(rows, cols, 3))
    ones = bits_TxL[t] == 1
    dots.set_data(xs[ones], ys[ones])
    heading.set_text(
        f'{title}tick {t + 1}/{len(bits_TxL)}, certainty {float(certainty_T[t]):.3f}, '
        f'{int(right_L.sum())}/{length} right'
    )
    frames.append(plots.frame(fig))
  return plots.save_gif(frames, path, frame_ms)
