"""Maze routes (the reference's tasks/mazes): the model, loss and metrics.

Inputs NHWC maze images, targets (B, R): the route's moves (up, down, left,
right, wait). The model answers all R moves at every tick (out_dims 5R,
reshaped (R, 5)). Data: generated perfect mazes, or the reference's maze
folders when `config.data_dir` is set (ctm_jax/data/mazes.py).

Dimension glossary: B batch, T ticks, R route length.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import compiling
from ctm_jax import evaluators
from ctm_jax import losses
from ctm_jax.analysis import plots
from ctm_jax.data import mazes as maze_data
from ctm_jax.models import ff as ff_model
from ctm_jax.models import lstm as lstm_model
from ctm_jax.tasks import base

MOVES = 5  # up, down, left, right, wait


def maze_loss(
    predictions_BxOxT,
    certainties_Bx2xT,
    targets_BxR,
    cirriculum_lookahead: int = 5,
    use_most_certain: bool = True,
):
  """Maze route loss with the reference's auto-curriculum.

  Only route steps before `upto` count, where `upto` is the end of the longest
  correctly predicted route prefix (best tick) plus `cirriculum_lookahead`.
  Returns (loss, most_certain_B, upto_B).
  """
  batch, ticks = predictions_BxOxT.shape[0], predictions_BxOxT.shape[-1]
  logits_BxRx5xT = predictions_BxOxT.reshape(batch, targets_BxR.shape[1], -1, ticks)
  route = targets_BxR.shape[1]
  loss_BxRxT = jax.vmap(losses.per_tick_cross_entropy, in_axes=(1, 1), out_axes=1)(
      logits_BxRx5xT, targets_BxR
  )
  correct_BxRxT = jnp.argmax(logits_BxRx5xT, axis=2) == targets_BxR[..., None]
  # A step counts as solved when every step up to it is correct.
  prefix_BxRxT = jnp.cumsum(correct_BxRxT, axis=1) == jnp.arange(1, route + 1)[None, :, None]
  prefix_BxRxT = prefix_BxRxT.at[:, 0].set(True)
  # argmax of the cumulative sum = last solved step (first index of the max).
  last_solved_BxT = jnp.argmax(jnp.cumsum(prefix_BxRxT, axis=1), axis=1)
  upto_B = last_solved_BxT.max(-1) + cirriculum_lookahead
  mask_BxR = (jnp.arange(route)[None, :] < upto_B[:, None]).astype(loss_BxRxT.dtype)
  loss_BxT = (loss_BxRxT * mask_BxR[..., None]).sum(1) / mask_BxR.sum(1)[:, None]
  loss, chosen_B = losses.select_ticks(loss_BxT, certainties_Bx2xT, use_most_certain)
  return loss, chosen_B, upto_B


def route_arrays(model, variables, images):
  """Per-tick attention (`attention_BxTxN`), each tick's predicted route
  (`routes_BxTxR`) and certainty (`certainty_BxT`) of a few mazes."""
  output = model.apply(variables, images, track=True)
  batch, _, ticks = output.predictions.shape
  logits_BxRx5xT = output.predictions.reshape(batch, -1, MOVES, ticks)
  return {
      'attention_BxTxN': evaluators.head_mean_attention(output),
      'routes_BxTxR': jnp.moveaxis(jnp.argmax(logits_BxRx5xT, axis=2), 2, 1),
      'certainty_BxT': output.certainties[:, 1].astype(jnp.float32),
  }


class RouteGifs(evaluators.TrackedGifs):
  """`route_<step>_<i>.gif` for the first `count` held-out mazes: per tick, the
  attention over the maze and the route predicted at that tick, walked from the
  start (the paper's maze figure)."""

  def __init__(self, context, count: int, expand_range: bool):
    super().__init__(context, count, evaluators.tracked_step(route_arrays))
    self.expand_range = expand_range

  def draw_image(self, index, tracked, attention_Txhxw, step):
    draw_route_gif(
        self.images[index],
        self.expand_range,
        attention_Txhxw,
        tracked,
        os.path.join(self.context.plot_dir, f'route_{step:07d}_{index}.gif'),
        title=f'step {step}, maze {index}: ',
    )


def draw_route_gif(inputs_HxWx3, expand_range, attention_Txhxw, tracked, path, title) -> str:
  """The route gif of one maze as the model read it, from its `route_arrays` row."""
  image_HxWx3 = (inputs_HxWx3 + 1) / 2 if expand_range else inputs_HxWx3
  start = np.argwhere(np.all(image_HxWx3 == np.array(maze_data.START), axis=-1))[0]
  return route_gif(
      image_HxWx3,
      attention_Txhxw,
      tracked['routes_BxTxR'],
      tracked['certainty_BxT'],
      tuple(int(v) for v in start),
      path,
      title=title,
  )


def route_length(config) -> int:
  """R of a training run's config or of an import's (its out_dims are 5R)."""
  if 'maze_route_length' in config:
    return int(config.maze_route_length)
  return int(config.model_kwargs.out_dims) // MOVES


@base.register
class Maze(base.Task, base.Supervised, base.Predicts, base.ImportsReference):
  name = 'mazes'
  reference_loss = 'maze_loss'
  config_keys = frozenset(
      {
          'maze_route_length',
          'image_shape',
          'cirriculum_lookahead',
          'data_dir',
          'augment_p',
          'expand_range',
          'n_route_gifs',
      }
  )
  identity_keys = ('maze_route_length', 'image_shape')
  baselines = {'lstm': lstm_model.LSTMBaseline, 'ff': ff_model.FFBaseline}

  def validate(self, config):
    for key in ('maze_route_length', 'cirriculum_lookahead'):
      value = config[key]
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'config.{key}={value!r}: must be a positive integer')
    gifs = config.n_route_gifs
    if not isinstance(gifs, int) or isinstance(gifs, bool) or gifs < 0:
      raise ValueError(f'config.n_route_gifs={gifs!r}: must be a non-negative integer')

  def check_data(self, config):
    maze_data.check_config(config)

  def train_source(self, config):
    return maze_data.train_source(config)

  def eval_source(self, config):
    return maze_data.eval_source(config)

  def train_transform(self, config):
    return maze_data.train_transform(config)

  def record_spec(self, config):
    return {
        'inputs': (tuple(config.image_shape), np.dtype(np.float32)),
        'targets': ((config.maze_route_length,), np.dtype(np.int32)),
    }

  def synthetic_batch(self, config, batch_size, seed):
    rng = np.random.default_rng(seed)
    return {
        'inputs': rng.standard_normal((batch_size, *config.image_shape), dtype=np.float32),
        'targets': rng.integers(0, MOVES, (batch_size, config.maze_route_length)).astype(np.int32),
    }

  def model_kwargs(self, config):
    route = config.maze_route_length
    return {
        **config.model.to_dict(),
        'out_dims': MOVES * route,
        'prediction_reshaper': (route, MOVES),
    }

  def loss(self, config, output, batch):
    loss, most_certain_B, upto_B = maze_loss(
        output.predictions,
        output.certainties,
        batch['targets'],
        config.cirriculum_lookahead,
        config.use_most_certain,
    )
    return loss, {'most_certain_B': most_certain_B, 'upto_B': upto_B}

  def _hits(self, output, batch):
    """Whether each route step is right at each tick, (B, R, T)."""
    batch_size, _, ticks = output.predictions.shape
    logits_BxRx5xT = output.predictions.reshape(batch_size, -1, MOVES, ticks)
    return jnp.argmax(logits_BxRx5xT, axis=2) == batch['targets'][..., None]

  def correct(self, output, batch):
    """Fraction of route steps right at every tick, (B, T)."""
    return self._hits(output, batch).mean(axis=1)

  def train_metrics(self, config, output, batch, loss, aux):
    """The per-step accuracies, plus the full-route solve rate (every step right,
    the wait padding included, as the reference's per-maze accuracy)."""
    metrics = super().train_metrics(config, output, batch, loss, aux)
    solved_BxT = self._hits(output, batch).all(axis=1).astype(jnp.float32)
    rows = jnp.arange(solved_BxT.shape[0])
    metrics.update(
        solved_tick_sum=solved_BxT.sum(0),
        solved_most_certain_sum=solved_BxT[rows, aux['most_certain_B']].sum(),
        solved_last_sum=solved_BxT[:, -1].sum(),
    )
    return metrics

  def eval_arrays(self, config, output, batch, aux):
    arrays = super().eval_arrays(config, output, batch, aux)
    arrays['solved_BxT'] = self._hits(output, batch).all(axis=1).astype(jnp.float32)
    return arrays

  evals = {
      **base.Supervised.evals,
      'solved': lambda context: evaluators.TopK(context, 'solved_BxT', 'solved', 'full-route solve rate'),
      'route_gifs': lambda context: (
          RouteGifs(context, context.config.n_route_gifs, context.config.expand_range)
          if context.config.n_route_gifs else None
      ),
  }
  default_evals = ('tick_accuracy', 'adaptive_compute', 'solved', 'route_gifs')

  def read_input(self, config, source):
    """A reference-format maze PNG (black walls, red start, green goal; a
    drawn route is ignored); targets: its shortest route."""
    if source.lower().endswith('.npy'):
      return super().read_input(config, source)
    try:
      image_HxWx3 = maze_data.read_png(source)
    except OSError as e:
      raise ValueError(f'--input={source}: not a maze picture PIL can read ({e})') from None
    route = route_length(config)
    try:
      maze = maze_data.Maze.from_image(image_HxWx3)
    except ValueError as e:
      raise ValueError(f'--input={source}: {e}') from None
    path = maze_data.shortest_path(maze.free_HxW, maze.start, maze.goal)
    inputs = maze_data.model_input(image_HxWx3, maze_data.expand_range_of(config))
    return {
        'inputs': inputs[None],
        'targets': maze_data.pad_route(maze_data.directions(path), route)[None],
    }

  def describe(self, config, prediction_O):
    moves_R = prediction_O.reshape(-1, MOVES).argmax(-1)
    letters = ''.join('UDLR.'[m] for m in moves_R)
    return f'route {letters}'

  def fresh_example(self, config, seed):
    # A split of its own: never a train or held-out maze of a generated run.
    record = maze_data.GeneratedMazes(config.image_shape[0], config.maze_route_length, seed, 1, 'fresh')[0]
    inputs_HxWx3 = maze_data.model_input(record['image'], maze_data.expand_range_of(config))
    return {'inputs': inputs_HxWx3[None], 'targets': record['route'][None]}

  def trace_path(self, config, inputs, prediction_O):
    image_HxWx3 = np.asarray(inputs, np.float32)
    if maze_data.expand_range_of(config):
      image_HxWx3 = (image_HxWx3 + 1) / 2
    starts = np.argwhere(np.all(image_HxWx3 == np.array(maze_data.START), axis=-1))
    if not len(starts):
      return None
    free_HxW = ~np.all(image_HxWx3 == 0, axis=-1)
    cells, blocked = walk_route(free_HxW, tuple(int(v) for v in starts[0]), prediction_O.reshape(-1, MOVES).argmax(-1))
    return {'cells': [list(map(int, c)) for c in cells], 'blocked': None if blocked is None else list(map(int, blocked))}

  def prediction_gif(self, config, model, variables, batch, path):
    images = batch['inputs']
    tracked = jax.device_get(compiling.jit(route_arrays, static_argnums=0)(model, variables, images))
    grid = evaluators.feature_grid(model, images.shape[1:])
    return draw_route_gif(
        images[0],
        maze_data.expand_range_of(config),
        tracked['attention_BxTxN'][0].reshape(-1, *grid),
        {k: v[0] for k, v in tracked.items()},
        path,
        title=f'{os.path.basename(path)}: ',
    )

  def matches_reference_args(self, args):
    return 'maze_route_length' in args or str(args.get('dataset')).startswith('mazes')

  def matches_model_kwargs(self, kwargs):
    reshaper = list(kwargs.get('prediction_reshaper') or [])
    return len(reshaper) == 2 and reshaper[1] == MOVES  # (route, moves)

  def reference_model_kwargs(self, args):
    route = int(base.required_arg(args, 'maze_route_length', self.name))
    return {
        'out_dims': MOVES * route,
        'prediction_reshaper': [route, MOVES],
        'dropout_nlm': args.get('dropout_nlm'),
    }


# ---------------------------------------------------------------------------
# The task's picture.


def walk_route(free_HxW, start, route_R, moves=maze_data.MOVE_DELTAS):
  """([(y, x) from `start` on], the wall cell it stopped at or None): a route
  walked move by move (moves beyond `moves` wait) until its first wall."""
  height, width = free_HxW.shape
  y, x = start
  cells, blocked = [(y, x)], None
  for move in route_R:
    if move >= len(moves):
      continue  # wait
    dy, dx = moves[move]
    if not (0 <= y + dy < height and 0 <= x + dx < width and free_HxW[y + dy, x + dx]):
      blocked = (y + dy, x + dx)
      break
    y, x = y + dy, x + dx
    cells.append((y, x))
  return cells, blocked


def route_gif(
    image_HxWx3,
    attention_Txhxw,
    routes_TxR,
    certainty_T,
    start,
    path,
    moves=maze_data.MOVE_DELTAS,
    title: str = '',
    frame_ms: int = 200,
) -> str:
  """One frame per tick: the maze under the head-averaged attention map, and the
  route predicted at that tick walked from `start` (moves beyond `moves` wait;
  the walk stops at the first wall, marked with a cross)."""
  image_HxWx3 = np.clip(np.asarray(image_HxWx3, np.float32), 0, 1)
  height, width = image_HxWx3.shape[:2]
  free_HxW = ~np.all(image_HxWx3 == 0, axis=-1)
  fig, ax = plots.subplots(figsize=(3.6, 3.9), dpi=80)
  ax.imshow(image_HxWx3, interpolation='nearest')
  overlay = plots.attention_overlay(ax, attention_Txhxw[0], height, width, alpha=0.45)
  (line,) = ax.plot([], [], color='tab:cyan', linewidth=2)
  (cross,) = ax.plot([], [], 'x', color='tab:red', markersize=9, markeredgewidth=2)
  ax.set_axis_off()
  heading = fig.suptitle('', fontsize=8)
  fig.tight_layout(rect=(0, 0, 1, 0.92))
  frames = []
  for t in range(len(routes_TxR)):
    overlay.set_data(attention_Txhxw[t])
    overlay.set_clim(float(np.min(attention_Txhxw[t])), float(np.max(attention_Txhxw[t])))
    cells, blocked = walk_route(free_HxW, start, routes_TxR[t], moves)
    line.set_data([c[1] for c in cells], [c[0] for c in cells])
    cross.set_data([blocked[1]] if blocked else [], [blocked[0]] if blocked else [])
    heading.set_text(f'{title}tick {t + 1}/{len(routes_TxR)}, certainty {float(certainty_T[t]):.3f}')
    frames.append(plots.frame(fig))
  return plots.save_gif(frames, path, frame_ms)
