"""Tracking (the community's CTM task): frames of a moving object in, where it
will be `horizon` steps after the last frame out (ctm_jax/data/tracking.py
defines the data; docs/data.md says how).

Inputs (B, F, G, G, 1) frames, shown one after another (ctm_jax/models/
tracking.py); targets (B,): the answer's quadrant (4 classes) or cell
(G * G classes), by `config.tracking_target`. Evaluation: per-tick accuracy,
the adaptive-compute table and a gif per eval example.

Dimension glossary: B batch, T ticks, F frames, G grid side, C classes.
"""

import os

import jax
import jax.numpy as jnp
from matplotlib import patches
import numpy as np

from ctm_jax import compiling
from ctm_jax import evaluators
from ctm_jax.analysis import plots
from ctm_jax.data import tracking as tracking_data
from ctm_jax.models import tracking as tracking_model
from ctm_jax.tasks import base
from ctm_jax.tasks import image


def tracked_arrays(model, variables, frames_BxFxGxGx1) -> dict[str, jax.Array]:
  """What an example's gif draws: class probabilities `probs_BxTxC`,
  `certainty_BxT`, head-averaged attention `attention_BxTxN` (N patches)."""
  output = model.apply(variables, frames_BxFxGxGx1, track=True)
  return {
      'probs_BxTxC': jax.nn.softmax(jnp.moveaxis(output.predictions.astype(jnp.float32), 1, 2), axis=-1),
      'certainty_BxT': output.certainties[:, 1].astype(jnp.float32),
      'attention_BxTxN': evaluators.head_mean_attention(output),
  }


class TrackingGifs(evaluators.RecordGifs):
  """`tracking_<step>_<i>.gif` for the first `count` held-out examples."""

  def __init__(self, context, count: int):
    super().__init__(context, count, evaluators.tracked_step(tracked_arrays))

  def draw(self, index, record, tracked, step):
    config, model = self.context.config, self.context.model
    tracking_gif(
        record['inputs'], tracking_model.frame_of_tick(model.iterations, record['inputs'].shape[0],
                                                       model.ticks_per_frame),
        tracked['attention_BxTxN'], tracked['probs_BxTxC'], tracked['certainty_BxT'],
        config.tracking_target, os.path.join(self.context.plot_dir, f'tracking_{step:07d}_{index}.gif'),
        answer=record['position'], title=f'step {step}, eval example {index}: ',
    )


def _describe_class(target: str, grid: int, cls: int) -> str:
  if target == 'quadrant':
    return ('top-left', 'top-right', 'bottom-left', 'bottom-right')[cls] + ' quadrant'
  return f'cell (row {cls // grid}, col {cls % grid})'


def _is_import(config) -> bool:
  """An import's record (interop/torch.py) names its model, not the task's data."""
  return 'tracking_grid' not in config


def _answer_settings(config):
  """(grid, target) of a run's config, or of an import's from its classes."""
  if not _is_import(config):
    return int(config.tracking_grid), str(config.tracking_target)
  classes = int(config.model_kwargs['out_dims'])
  return (None, 'quadrant') if classes == 4 else (int(round(classes**0.5)), 'position')  # a quadrant needs no grid


def _settings(config):
  """(grid, frames, target) of a run's config."""
  return int(config.tracking_grid), int(config.tracking_frames), str(config.tracking_target)


@base.register
class Tracking(base.Task, base.Supervised, base.Predicts):
  name = 'object_tracking'
  config_keys = frozenset({'tracking_target', 'tracking_grid', 'tracking_frames', 'tracking_horizon',
                           'tracking_max_speed', 'n_tracking_gifs'})
  identity_keys = ('tracking_target', 'tracking_grid', 'tracking_frames')
  model_class = tracking_model.ContinuousThoughtMachineTracking
  baselines = {'lstm': tracking_model.LSTMTracking}

  def validate(self, config):
    try:
      tracking_data.check(config.tracking_grid, config.tracking_frames, config.tracking_horizon,
                          config.tracking_max_speed, config.tracking_target)
    except ValueError as e:
      raise ValueError(f'config.tracking_{e}') from None
    gifs = config.get('n_tracking_gifs')
    if not isinstance(gifs, int) or isinstance(gifs, bool) or gifs < 0:
      raise ValueError(f'config.n_tracking_gifs={gifs!r}: must be a non-negative integer')
    patch = config.model.get('patch_size', 4)
    if isinstance(patch, int) and (patch < 1 or config.tracking_grid % patch):
      raise ValueError(f'config.model.patch_size={patch}: must divide config.tracking_grid={config.tracking_grid}')
    ticks = config.model.iterations
    per_frame = config.model.get('ticks_per_frame', 1)
    if isinstance(per_frame, int) and config.tracking_frames * per_frame > ticks:
      raise ValueError(
          f'config.model.iterations={ticks}: {config.tracking_frames} frames x '
          f'config.model.ticks_per_frame={per_frame} need at least {config.tracking_frames * per_frame} ticks'
      )

  def record_spec(self, config):
    grid, frames, _ = _settings(config)
    return {
        'inputs': ((frames, grid, grid, 1), np.dtype(np.float32)),
        'targets': ((), np.dtype(np.int32)),
        'position': ((2,), np.dtype(np.int32)),
        'start': ((2,), np.dtype(np.int32)),
        'velocity': ((2,), np.dtype(np.int32)),
    }

  def train_source(self, config):
    return tracking_data.train_source(config)

  def eval_source(self, config):
    return tracking_data.eval_source(config)

  def synthetic_batch(self, config, batch_size, seed):
    source = tracking_data.TrackingSource(*tracking_data.settings(config), seed, batch_size)
    return {k: np.stack([source[i][k] for i in range(batch_size)]) for k in self.record_spec(config)}

  def model_kwargs(self, config):
    grid, _, target = _settings(config)
    return {**config.model.to_dict(), 'out_dims': tracking_data.num_classes(grid, target),
            'prediction_reshaper': (-1,)}

  def loss(self, config, output, batch):
    loss, most_certain_B = image.image_classification_loss(
        output.predictions, output.certainties, batch['targets'], config.use_most_certain
    )
    return loss, {'most_certain_B': most_certain_B}

  def correct(self, output, batch):
    return (jnp.argmax(output.predictions, axis=1) == batch['targets'][:, None]).astype(jnp.float32)

  evals = {
      **base.Supervised.evals,
      'tracking_gifs': lambda context: (
          TrackingGifs(context, context.config.n_tracking_gifs) if context.config.n_tracking_gifs else None
      ),
  }
  default_evals = ('tick_accuracy', 'adaptive_compute', 'tracking_gifs')

  def read_input(self, config, source):
    """A .npy of frames (F, G, G, 1), or the motion as text: 'ROW COL VROW VCOL'
    (the first frame's cell and the velocity), drawn into the run's frames."""
    if _is_import(config):  # its frames' count and motion are not recorded: the frames themselves
      if not source.lower().endswith('.npy'):
        raise ValueError(f"--input={source}: an imported tracking model records no grid, frames or horizon to "
                         "draw 'ROW COL VROW VCOL' with; give a .npy of its frames (F, G, G, 1)")
      return super().read_input(config, source)
    grid, frames, target = _settings(config)
    if source.lower().endswith('.npy'):
      batch = super().read_input(config, source)
      if batch['inputs'].shape[1:] != (frames, grid, grid, 1):
        raise ValueError(f'--input={source}: shape {batch["inputs"].shape[1:]}; the model reads '
                         f'{(frames, grid, grid, 1)} frames')
      return batch
    words = base.text_input(source).replace(',', ' ').split()
    try:
      row, col, v_row, v_col = (int(w) for w in words)
    except ValueError:
      raise ValueError(f"--input={source}: expected 'ROW COL VROW VCOL' (the first cell and the velocity, "
                       'integers) or a .npy of frames') from None
    speed = int(config.tracking_max_speed)
    if not (0 <= row < grid and 0 <= col < grid) or max(abs(v_row), abs(v_col)) > speed or v_row == v_col == 0:
      raise ValueError(f'--input={source}: the cell must lie in [0, {grid - 1}] and the velocity be nonzero '
                       f'with components in [-{speed}, {speed}]')
    start_2, velocity_2 = np.array([row, col]), np.array([v_row, v_col])
    frames_FxGxGx1 = np.zeros((frames, grid, grid, 1), np.float32)
    for f in range(frames):
      r, c = tracking_data.position_at(start_2, velocity_2, f, grid)
      frames_FxGxGx1[f, r, c, 0] = 1.0
    answer = tracking_data.position_at(start_2, velocity_2, frames - 1 + int(config.tracking_horizon), grid)
    return {'inputs': frames_FxGxGx1[None],
            'targets': np.array([tracking_data.answer_class(answer, grid, target)], np.int32)}

  def describe(self, config, prediction_O):
    grid, target = _answer_settings(config)
    probs_O = np.exp(prediction_O - prediction_O.max())
    probs_O /= probs_O.sum()
    top = int(np.argmax(probs_O))
    return f'{_describe_class(target, grid, top)} (p {probs_O[top]:.3f})'

  def prediction_gif(self, config, model, variables, batch, path):
    frames = np.asarray(batch['inputs'])
    arrays = jax.device_get(compiling.jit(tracked_arrays, static_argnums=0)(model, variables, frames))
    return tracking_gif(
        frames[0], tracking_model.frame_of_tick(model.iterations, frames.shape[1], model.ticks_per_frame),
        arrays['attention_BxTxN'][0], arrays['probs_BxTxC'][0], arrays['certainty_BxT'][0],
        _answer_settings(config)[1], path, title=f'{os.path.basename(path)}: ',
    )


# ---------------------------------------------------------------------------
# The task's picture.


def tracking_gif(frames_FxGxGx1, frame_T, attention_TxN, probs_TxC, certainty_T, target, path,
                 answer=None, title='', frame_ms: int = 250) -> str:
  """One frame per tick: left, the frame shown at that tick (earlier frames
  faint) under the attention; right, the answer's probability over the grid
  (per cell, or per quadrant), the true cell ringed; the heading gives the
  answer and the certainty."""
  frames_FxGxG = np.asarray(frames_FxGxGx1)[..., 0]
  grid = frames_FxGxG.shape[-1]
  fig, (ax_in, ax_out) = plots.subplots(1, 2, figsize=(6.4, 3.6), dpi=80)
  shown = ax_in.imshow(np.zeros((grid, grid)), cmap='gray', vmin=0, vmax=1)
  overlay = ax_in.imshow(np.zeros((grid, grid)), cmap='inferno', alpha=0.5)
  belief = ax_out.imshow(np.zeros((grid, grid)), cmap='viridis', vmin=0, vmax=1)
  if answer is not None:
    ax_out.add_patch(patches.Rectangle((answer[1] - 0.5, answer[0] - 0.5), 1, 1, fill=False, edgecolor='red',
                                       linewidth=2))
  for ax, name in ((ax_in, 'frame shown, attention'), (ax_out, f'P(answer), {target}')):
    ax.set_axis_off()
    ax.set_title(name, fontsize=8)
  heading = fig.suptitle('', fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.86))
  half = grid // 2
  frames = []
  for t in range(len(frame_T)):
    f = int(frame_T[t])
    seen = np.max(frames_FxGxG[: f + 1] * np.linspace(0.3, 1.0, f + 1)[:, None, None], axis=0)
    shown.set_data(seen)
    attention = np.asarray(attention_TxN[t], np.float64)
    side = int(round(np.sqrt(attention.size)))  # the patch grid, drawn over its cells
    attention = np.kron(attention.reshape(side, side), np.ones((grid // side, grid // side)))
    overlay.set_data(attention)
    overlay.set_clim(float(attention.min()), float(attention.max()) + 1e-9)
    probs = np.asarray(probs_TxC[t])
    if target == 'quadrant':
      cells = np.kron(probs.reshape(2, 2), np.ones((half, half)))
    else:
      cells = probs.reshape(grid, grid)
    belief.set_data(cells)
    belief.set_clim(0, max(float(cells.max()), 1e-6))
    top = int(np.argmax(probs))
    heading.set_text(
        f'{title}tick {t + 1}/{len(frame_T)}, frame {f + 1}\n'
        f'{_describe_class(target, grid, top)} (p {probs[top]:.2f}), certainty {float(certainty_T[t]):.2f}'
    )
    frames.append(plots.frame(fig))
  return plots.save_gif(frames, path, frame_ms)
