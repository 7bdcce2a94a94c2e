"""Metric sinks: metrics.jsonl and TensorBoard event files (process 0 only).

Both are written on the calling thread and flushed at once: a full disk or a
lost mount raises `WriteError` at the step that failed, never blocks the loop
behind a dead background writer.
"""

import json
import os
import time

import jax
import numpy as np


class WriteError(OSError):
  """A run's output could not be written (one line: which file, which step, why)."""


def _fail(path: str, step: int, error: OSError):
  reason = error.strerror or str(error)
  raise WriteError(
      error.errno, f'cannot write {path} at step {step}: {reason}; free space or fix the '
      'path, then rerun the same command to resume from the last checkpoint'
  ) from error


class MetricWriter:
  """Writes scalars to `metrics.jsonl` and TensorBoard under `workdir/tensorboard`."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.jsonl_path = os.path.join(workdir, 'metrics.jsonl')
    self.tensorboard_dir = os.path.join(workdir, 'tensorboard')
    if not self.enabled:
      return
    # pylint: disable=g-import-not-at-top
    from tensorboardX import event_file_writer
    from tensorboardX.proto import event_pb2
    from tensorboardX import summary

    self._event_pb2, self._summary = event_pb2, summary
    try:
      _truncate_after(self.jsonl_path, resume_step)
      os.makedirs(self.tensorboard_dir, exist_ok=True)
      self._tb = event_file_writer.EventsWriter(os.path.join(self.tensorboard_dir, 'events'))
      if resume_step:
        # TensorBoard drops this file's older events from `resume_step` on: lost work.
        self._tb.write_event(
            event_pb2.Event(
                step=resume_step,
                wall_time=time.time(),
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
            )
        )
      self._tb.flush()
      self._jsonl = open(self.jsonl_path, 'a')
    except OSError as e:
      _fail(getattr(e, 'filename', None) or self.tensorboard_dir, resume_step, e)

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    path = self.tensorboard_dir
    try:
      now = time.time()
      for name, value in scalars.items():
        self._tb.write_event(
            self._event_pb2.Event(
                step=step, wall_time=now, summary=self._summary.scalar(name, value)
            )
        )
      self._tb.flush()
      path = self.jsonl_path
      self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
      self._jsonl.flush()
    except OSError as e:
      _fail(path, step, e)

  def close(self):
    if not self.enabled:
      return
    for close in (self._tb.close, self._jsonl.close):
      try:
        close()
      except OSError:
        pass  # already reported by the write that failed


def _truncate_after(path: str, step: int):
  """Drops records past the resumed step: they belong to work that was lost."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
  with open(path + '.tmp', 'w') as f:
    f.writelines(keep)
  os.replace(path + '.tmp', path)
