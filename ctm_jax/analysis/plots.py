"""Plots drawn on the host from evaluation metrics, never inside the train loop:
the task-free ones (per-tick curves, adaptive compute, attention over an
image) and the helpers a task's own pictures are drawn with (tasks/<name>.py).

Dimension glossary: T ticks, K thresholds, H x W image, h x w attended feature
map, A top classes shown.
"""

import io
import os

from matplotlib.backends import backend_agg
from matplotlib import figure as figure_lib
import numpy as np
from PIL import Image

from ctm_jax import storage


def subplots(*grid, **kwargs):
  """(figure, axes) drawn by Agg to files only. Not pyplot: no GUI backend on
  training machines, and a notebook's own backend is left as it is."""
  fig = figure_lib.Figure(figsize=kwargs.pop('figsize'), dpi=kwargs.pop('dpi'))
  backend_agg.FigureCanvasAgg(fig)
  return fig, fig.subplots(*grid, **kwargs)


def plot_ticks(accuracy_T, certainty_T, path, title: str = '', label: str = 'accuracy') -> str:
  """Accuracy (or another per-tick rate, `label`) and mean certainty against
  tick: how the model 'thinks' over time."""
  ticks = np.arange(1, len(accuracy_T) + 1)
  fig, ax = subplots(figsize=(7, 4), dpi=100)
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
  _write(path, lambda f: fig.savefig(f, format=os.path.splitext(str(path))[1][1:] or 'png'))
  return str(path)


def plot_adaptive_compute(adaptive: dict, path, title: str = '') -> str:
  """Accuracy against mean ticks used when each example stops once certain enough.

  `adaptive`: ctm_jax.analysis.evaluation.adaptive's table (`thresholds`,
  `accuracy`, `mean_ticks` (K,), `ticks`, `acc_last`, `acc_most_certain`).
  """
  fig, ax = subplots(figsize=(7, 4), dpi=100)
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
  _write(path, lambda f: fig.savefig(f, format=os.path.splitext(str(path))[1][1:] or 'png'))
  return str(path)


def _write(path, save) -> None:
  """`save(file)` into `path`, local or in a bucket, as one whole write."""
  buffer = io.BytesIO()
  save(buffer)
  storage.write_bytes(str(path), buffer.getvalue())


def unit_range(image_HxWxC):
  """Per-image min/max to [0, 1]; a grey image for a constant one."""
  image_HxWxC = np.asarray(image_HxWxC, np.float32)
  low, high = image_HxWxC.min(), image_HxWxC.max()
  image_HxWxC = (image_HxWxC - low) / (high - low) if high > low else np.full_like(image_HxWxC, 0.5)
  return image_HxWxC[..., 0] if image_HxWxC.shape[-1] == 1 else image_HxWxC


def frame(fig):
  """The figure as it is drawn now, as a palette image."""
  fig.canvas.draw()
  frame = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
  # Octree palettes: far quicker than Pillow's default median cut.
  return frame.quantize(method=Image.Quantize.FASTOCTREE)


def attention_overlay(ax, attention_hxw, height: int, width: int, alpha: float):
  """An attention map drawn over an (H, W) picture already on `ax`: its cells
  cover the picture (extent stretches (h, w) over (H, W))."""
  return ax.imshow(
      attention_hxw,
      cmap='inferno',
      alpha=alpha,
      interpolation='bilinear',
      extent=(-0.5, width - 0.5, height - 0.5, -0.5),
  )


def save_gif(frames, path, frame_ms: int) -> str:
  _write(path, lambda f: frames[0].save(
      f, format='GIF', save_all=True, append_images=frames[1:], duration=frame_ms, loop=0))
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
  fig, (ax_image, ax_probs) = subplots(1, 2, figsize=(6, 3.2), dpi=80)
  ax_image.imshow(unit_range(image_HxWxC), cmap='gray', interpolation='nearest')
  overlay = attention_overlay(ax_image, attention_Txhxw[0], height, width, alpha=0.55)
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
    frames.append(frame(fig))
  return save_gif(frames, path, frame_ms)
