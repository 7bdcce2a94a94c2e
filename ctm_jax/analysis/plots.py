"""Plots drawn on the host from evaluation metrics, never inside the train loop.

Dimension glossary: T ticks.
"""

import matplotlib

matplotlib.use('Agg')  # files only; no display on training machines
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position


def plot_ticks(accuracy_T, certainty_T, path, title: str = '') -> str:
  """Accuracy and mean certainty against tick: how the model 'thinks' over time."""
  ticks = np.arange(1, len(accuracy_T) + 1)
  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  ax.plot(ticks, accuracy_T, label='accuracy', color='tab:blue', lw=2)
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
  plt.close(fig)
  return str(path)
