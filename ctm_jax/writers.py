"""Metric sinks: metrics.jsonl and TensorBoard event files (process 0 only)."""

import json
import os

import jax
import numpy as np


class MetricWriter:
  """Writes scalars to `metrics.jsonl` and TensorBoard under `workdir/tensorboard`."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.jsonl_path = os.path.join(workdir, 'metrics.jsonl')
    self.tensorboard_dir = os.path.join(workdir, 'tensorboard')
    if not self.enabled:
      return
    _truncate_after(self.jsonl_path, resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    self._tb = SummaryWriter(self.tensorboard_dir, purge_step=resume_step or None)
    self._jsonl = open(self.jsonl_path, 'a')

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def _truncate_after(path: str, step: int):
  """Drops records past the resumed step: they belong to work that was lost."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
  with open(path + '.tmp', 'w') as f:
    f.writelines(keep)
  os.replace(path + '.tmp', path)
