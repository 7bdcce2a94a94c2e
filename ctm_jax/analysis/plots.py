"""Plots drawn on the host from evaluation metrics, never inside the train loop.

Dimension glossary: T ticks, K thresholds, H x W image, h x w attended feature
map, A top classes shown.
"""

from matplotlib.backends import backend_agg
from matplotlib import colormaps
from matplotlib import figure as figure_lib
import numpy as np
from PIL import Image
from PIL import ImageDraw


def _subplots(*grid, **kwargs):
  """(figure, axes) drawn by Agg to files only. Not pyplot: no GUI backend on
  training machines, and a notebook's own backend is left as it is."""
  fig = figure_lib.Figure(figsize=kwargs.pop('figsize'), dpi=kwargs.pop('dpi'))
  backend_agg.FigureCanvasAgg(fig)
  return fig, fig.subplots(*grid, **kwargs)


def plot_ticks(accuracy_T, certainty_T, path, title: str = '', label: str = 'accuracy') -> str:
  """Accuracy (or another per-tick rate, `label`) and mean certainty against
  tick: how the model 'thinks' over time."""
  ticks = np.arange(1, len(accuracy_T) + 1)
  fig, ax = _subplots(figsize=(7, 4), dpi=100)
  ax.plot(ticks, accuracy_T, label=label, color='tab:blue', lw=2)
  ax.plot(ticks, certainty_T, label='certainty (1 - normalised entropy)', color='tab:orange', lw=2)
  best = int(np.argmax(accuracy_T))
  ax.scatter([ticks[best]], [accuracy_T[best]], color='tab:blue', zorder=3)
  ax.set_xlabel('internal tick')
  ax.set_ylim(0, 1.02)
  ax.set_xlim(1, max(2, len(ticks)))
  ax.grid(alpha=0.3)
  ax.legend(loc='lower right')
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path)
  return str(path)


def plot_adaptive_compute(adaptive: dict, path, title: str = '') -> str:
  """Accuracy against mean ticks used when each example stops once certain enough.

  `adaptive`: ctm_jax.analysis.evaluation.adaptive's table (`thresholds`,
  `accuracy`, `mean_ticks` (K,), `ticks`, `acc_last`, `acc_most_certain`).
  """
  fig, ax = _subplots(figsize=(7, 4), dpi=100)
  ticks_K, acc_K = np.asarray(adaptive['mean_ticks']), np.asarray(adaptive['accuracy'])
  ax.plot(ticks_K, acc_K, marker='o', color='tab:blue', lw=2, label='stop at certainty threshold')
  for th, x, y in zip(adaptive['thresholds'], ticks_K, acc_K):
    ax.annotate(f'{th:g}', (x, y), textcoords='offset points', xytext=(4, -12), fontsize=8)
  all_ticks = f"all {adaptive['ticks']} ticks"
  ax.axhline(adaptive['acc_last'], color='tab:gray', ls='--', label=f'last tick ({all_ticks})')
  ax.axhline(
      adaptive['acc_most_certain'], color='tab:orange', ls=':', label=f'most certain ({all_ticks})'
  )
  ax.set_xlabel('mean internal ticks used')
  ax.set_ylabel('accuracy')
  ax.set_xlim(0.5, adaptive['ticks'] + 0.5)
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(loc='lower right', fontsize=8)
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path)
  return str(path)


def _unit_range(image_HxWxC):
  """Per-image min/max to [0, 1]; a grey image for a constant one."""
  image_HxWxC = np.asarray(image_HxWxC, np.float32)
  low, high = image_HxWxC.min(), image_HxWxC.max()
  image_HxWxC = (image_HxWxC - low) / (high - low) if high > low else np.full_like(image_HxWxC, 0.5)
  return image_HxWxC[..., 0] if image_HxWxC.shape[-1] == 1 else image_HxWxC


def _frame(fig):
  """The figure as it is drawn now, as a palette image."""
  fig.canvas.draw()
  frame = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
  # Octree palettes: far quicker than Pillow's default median cut.
  return frame.quantize(method=Image.Quantize.FASTOCTREE)


def _save_gif(frames, path, frame_ms: int) -> str:
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
  return str(path)


def attention_gif(
    image_HxWxC,
    attention_Txhxw,
    top_probs_TxA,
    top_classes_TxA,
    certainty_T,
    path,
    label: int | None = None,
    title: str = '',
    frame_ms: int = 200,
) -> str:
  """One frame per tick: the image under the head-averaged attention map
  (stretched over it), the most probable classes, and the certainty."""
  ticks, num_top = np.shape(top_probs_TxA)
  height, width = np.shape(image_HxWxC)[:2]
  fig, (ax_image, ax_probs) = _subplots(1, 2, figsize=(6, 3.2), dpi=80)
  ax_image.imshow(_unit_range(image_HxWxC), cmap='gray', interpolation='nearest')
  # The map's cells cover the image: extent stretches (h, w) over (H, W).
  overlay = ax_image.imshow(
      attention_Txhxw[0],
      cmap='inferno',
      alpha=0.55,
      interpolation='bilinear',
      extent=(-0.5, width - 0.5, height - 0.5, -0.5),
  )
  ax_image.set_axis_off()
  rows = np.arange(num_top)[::-1]  # most probable on top
  bars = ax_probs.barh(rows, top_probs_TxA[0], color='tab:blue')
  names = [ax_probs.text(0.02, y, '', va='center', fontsize=8) for y in rows]
  ax_probs.set_xlim(0, 1)
  ax_probs.set_yticks([])
  ax_probs.set_xlabel('probability')
  heading = fig.suptitle('', fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.93))  # once: the frames share one layout
  frames = []
  for t in range(ticks):
    overlay.set_data(attention_Txhxw[t])
    overlay.set_clim(float(np.min(attention_Txhxw[t])), float(np.max(attention_Txhxw[t])))
    for bar, name, prob, cls in zip(bars, names, top_probs_TxA[t], top_classes_TxA[t]):
      bar.set_width(float(prob))
      bar.set_color('tab:green' if cls == label else 'tab:blue')
      name.set_text(f'class {int(cls)}: {float(prob):.2f}')
    truth = '' if label is None else f', label {label}'
    heading.set_text(f'{title}tick {t + 1}/{ticks}, certainty {float(certainty_T[t]):.3f}{truth}')
    frames.append(_frame(fig))
  return _save_gif(frames, path, frame_ms)


def route_gif(
    image_HxWx3,
    attention_Txhxw,
    routes_TxR,
    certainty_T,
    start,
    path,
    moves=((-1, 0), (1, 0), (0, -1), (0, 1)),
    title: str = '',
    frame_ms: int = 200,
) -> str:
  """One frame per tick: the maze under the head-averaged attention map, and the
  route predicted at that tick walked from `start` (moves beyond `moves` wait;
  the walk stops at the first wall, marked with a cross)."""
  image_HxWx3 = np.clip(np.asarray(image_HxWx3, np.float32), 0, 1)
  height, width = image_HxWx3.shape[:2]
  free_HxW = ~np.all(image_HxWx3 == 0, axis=-1)
  fig, ax = _subplots(figsize=(3.6, 3.9), dpi=80)
  ax.imshow(image_HxWx3, interpolation='nearest')
  overlay = ax.imshow(
      attention_Txhxw[0],
      cmap='inferno',
      alpha=0.45,
      interpolation='bilinear',
      extent=(-0.5, width - 0.5, height - 0.5, -0.5),
  )
  (line,) = ax.plot([], [], color='tab:cyan', linewidth=2)
  (cross,) = ax.plot([], [], 'x', color='tab:red', markersize=9, markeredgewidth=2)
  ax.set_axis_off()
  heading = fig.suptitle('', fontsize=8)
  fig.tight_layout(rect=(0, 0, 1, 0.92))
  frames = []
  for t in range(len(routes_TxR)):
    overlay.set_data(attention_Txhxw[t])
    overlay.set_clim(float(np.min(attention_Txhxw[t])), float(np.max(attention_Txhxw[t])))
    y, x = start
    ys, xs, blocked = [y], [x], None
    for move in routes_TxR[t]:
      if move >= len(moves):
        continue  # wait
      dy, dx = moves[move]
      if not (0 <= y + dy < height and 0 <= x + dx < width and free_HxW[y + dy, x + dx]):
        blocked = (y + dy, x + dx)
        break
      y, x = y + dy, x + dx
      ys.append(y)
      xs.append(x)
    line.set_data(xs, ys)
    cross.set_data([blocked[1]] if blocked else [], [blocked[0]] if blocked else [])
    heading.set_text(f'{title}tick {t + 1}/{len(routes_TxR)}, certainty {float(certainty_T[t]):.3f}')
    frames.append(_frame(fig))
  return _save_gif(frames, path, frame_ms)


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
  fig, (ax_in, ax_out) = _subplots(1, 2, figsize=(6, 3.4), dpi=80)
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
    frames.append(_frame(fig))
  return _save_gif(frames, path, frame_ms)


def question_gif(
    frames_in,
    attention_Txhxw,
    probs_TxC,
    certainty_T,
    path,
    answer: int | None = None,
    question: str = '',
    title: str = '',
    frame_ms: int = 250,
) -> str:
  """One frame per tick of an input that arrives over the ticks (Q&A-MNIST):
  left, what this tick shows (`frames_in[t]`: an (H, W, C) image, drawn under
  the head-averaged attention `attention_Txhxw[t]` where that is not None, or
  a text such as an operator), right, the probability of every answer (the
  right one green) and the certainty; the question above."""
  ticks, classes = np.shape(probs_TxC)
  fig, (ax_in, ax_probs) = _subplots(1, 2, figsize=(6.4, 3.4), dpi=80)
  image = ax_in.imshow(np.zeros((2, 2)), cmap='gray', vmin=0, vmax=1, interpolation='nearest')
  overlay = ax_in.imshow(np.zeros((2, 2)), cmap='inferno', alpha=0.0, interpolation='bilinear')
  label = ax_in.text(0.5, 0.5, '', ha='center', va='center', fontsize=26, transform=ax_in.transAxes, color='black')
  ax_in.set_axis_off()
  bars = ax_probs.bar(np.arange(classes), probs_TxC[0], color='tab:blue')
  ax_probs.set_ylim(0, 1)
  ax_probs.set_xticks(np.arange(classes))
  ax_probs.set_ylabel('probability')
  heading = fig.suptitle('', fontsize=8)
  fig.tight_layout(rect=(0, 0, 1, 0.82))
  frames = []
  for t in range(ticks):
    shown = frames_in[t]
    if isinstance(shown, str):
      image.set_data(np.ones((2, 2)))
      overlay.set_alpha(0.0)
      label.set_text(shown)
    else:
      height, width = np.shape(shown)[:2]
      image.set_data(_unit_range(shown))
      image.set_extent((-0.5, width - 0.5, height - 0.5, -0.5))
      label.set_text('')
      if attention_Txhxw[t] is None:
        overlay.set_alpha(0.0)
      else:
        overlay.set_data(attention_Txhxw[t])
        overlay.set_extent((-0.5, width - 0.5, height - 0.5, -0.5))
        overlay.set_clim(float(np.min(attention_Txhxw[t])), float(np.max(attention_Txhxw[t])))
        overlay.set_alpha(0.55)
    for c, bar in enumerate(bars):
      bar.set_height(float(probs_TxC[t, c]))
      bar.set_color('tab:green' if c == answer else 'tab:blue')
    truth = '' if answer is None else f', answer {answer}'
    heading.set_text(
        f'{question}\n{title}tick {t + 1}/{ticks}, certainty {float(certainty_T[t]):.3f}{truth}'
    )
    frames.append(_frame(fig))
  return _save_gif(frames, path, frame_ms)


def episode_gif(
    frames_SxHxWx3, post_SxTxD, probs_SxA, values_S, actions_S, path, action_names=None,
    max_neurons: int = 64, frame_ms: int = 60,
) -> str:
  """An agent's episode, one frame per environment step: the environment,
  the post-activations of up to `max_neurons` neurons over every tick so far
  (neurons down, ticks across, blue negative, red positive), and the action
  probabilities with the chosen one marked and the value.

  S steps, T ticks per step, D neurons, A actions.
  """
  steps, ticks, neurons = post_SxTxD.shape
  if frames_SxHxWx3.shape[1] > 192:  # MiniGrid's full-grid frames: shrink for a small gif
    frames_SxHxWx3 = np.stack(
        [np.asarray(Image.fromarray(np.asarray(f, np.uint8)).resize((192, 192), Image.BILINEAR)) for f in frames_SxHxWx3]
    )
  shown = min(neurons, max_neurons)
  activity_DxST = post_SxTxD[:, :, :shown].reshape(steps * ticks, shown).T
  scale = float(np.abs(activity_DxST).max()) or 1.0
  colours = colormaps['seismic']((activity_DxST / scale + 1) / 2)[..., :3]
  height = max(frames_SxHxWx3.shape[1], 160)
  window = 100  # ticks shown: the newest
  names = action_names or [str(a) for a in range(probs_SxA.shape[1])]
  images = []
  for s in range(steps):
    canvas = Image.new('RGB', (frames_SxHxWx3.shape[2] + 360, height + 20), (255, 255, 255))
    canvas.paste(Image.fromarray(np.asarray(frames_SxHxWx3[s], np.uint8)), (0, 0))
    x0 = frames_SxHxWx3.shape[2] + 10
    end = (s + 1) * ticks
    raster = colours[:, max(0, end - window):end]
    raster_image = Image.fromarray((raster * 255).astype(np.uint8)).resize((200, height), Image.NEAREST)
    canvas.paste(raster_image, (x0, 0))
    draw = ImageDraw.Draw(canvas)
    bar_x = x0 + 210
    for a, p in enumerate(probs_SxA[s]):
      y = 10 + a * 18
      fill = (220, 60, 60) if a == int(actions_S[s]) else (90, 90, 200)
      draw.rectangle([bar_x, y, bar_x + int(100 * float(p)), y + 12], fill=fill)
      draw.text((bar_x + 104, y), names[a][:8], fill=(0, 0, 0))
    draw.text((bar_x, height - 20), f'value {float(values_S[s]):.2f}', fill=(0, 0, 0))
    draw.text((4, height + 4), f'step {s + 1}/{steps}', fill=(0, 0, 0))
    images.append(canvas.quantize(method=Image.Quantize.FASTOCTREE))
  return _save_gif(images, path, frame_ms)
