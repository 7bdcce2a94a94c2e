"""Metric sinks: metrics.jsonl and TensorBoard event files (process 0 only).

Both are written on the calling thread and flushed at once: a full disk or a
lost mount raises `WriteError` at the step that failed, never blocks the loop
behind a dead background writer.

In a bucket (gs://), which cannot append, both are objects rewritten whole
at every write: metrics.jsonl from the lines kept in memory, the event file
from a local staging copy. An object write is whole or nothing, so a run
killed mid-write leaves the previous version, never a cut-off line.
"""

import json
import os
import shutil
import tempfile
import time

import jax
import numpy as np


from ctm_jax import storage


class WriteError(OSError):
  """A run's output could not be written (one line: which file, which step, why)."""


def _fail(path: str, step: int, error: Exception):
  text = str(error).strip()
  reason = getattr(error, 'strerror', None) or (text.splitlines()[0] if text else type(error).__name__)
  raise WriteError(
      getattr(error, 'errno', None), f'cannot write {path} at step {step}: {reason}; free space or fix the '
      'path, then rerun the same command to resume from the last checkpoint'
  ) from error


class MetricWriter:
  """Writes scalars to `metrics.jsonl` and TensorBoard under `workdir/tensorboard`."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.jsonl_path = storage.join(workdir, 'metrics.jsonl')
    self.tensorboard_dir = storage.join(workdir, 'tensorboard')
    self.bucket = storage.is_bucket(workdir)
    if not self.enabled:
      return
    # pylint: disable=g-import-not-at-top
    from tensorboardX import event_file_writer
    from tensorboardX.proto import event_pb2
    from tensorboardX import summary

    self._event_pb2, self._summary = event_pb2, summary
    errors = Exception if self.bucket else OSError  # gcsfs raises its own HTTP errors
    try:
      if self.bucket:
        self._lines = _kept_lines(self.jsonl_path, resume_step)
        storage.write_text(self.jsonl_path, ''.join(self._lines))
        self._staging = tempfile.mkdtemp(prefix='ctm_tensorboard_')
        events_dir = self._staging
      else:
        _truncate_after(self.jsonl_path, resume_step)
        os.makedirs(self.tensorboard_dir, exist_ok=True)
        events_dir = self.tensorboard_dir
      self._tb = event_file_writer.EventsWriter(os.path.join(events_dir, 'events'))
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
      self._upload_events()
      self._jsonl = None if self.bucket else open(self.jsonl_path, 'a')
    except errors as e:
      _fail(getattr(e, 'filename', None) or self.tensorboard_dir, resume_step, e)

  def _upload_events(self):
    """The staged event files, each replaced whole in the bucket."""
    if self.bucket:
      storage.copy_up(self._staging, self.tensorboard_dir)

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    path = self.tensorboard_dir
    errors = Exception if self.bucket else OSError
    try:
      now = time.time()
      for name, value in scalars.items():
        self._tb.write_event(
            self._event_pb2.Event(
                step=step, wall_time=now, summary=self._summary.scalar(name, value)
            )
        )
      self._tb.flush()
      self._upload_events()
      path = self.jsonl_path
      line = json.dumps({'step': step, **scalars}) + '\n'
      if self.bucket:
        self._lines.append(line)
        storage.write_text(self.jsonl_path, ''.join(self._lines))
      else:
        self._jsonl.write(line)
        self._jsonl.flush()
    except errors as e:
      _fail(path, step, e)

  def close(self):
    if not self.enabled:
      return
    for close in (self._tb.close, self._jsonl.close if self._jsonl else None):
      try:
        if close:
          close()
      except OSError:
        pass  # already reported by the write that failed
    if self.bucket:
      shutil.rmtree(self._staging, ignore_errors=True)


def _kept_lines(path: str, step: int) -> list[str]:
  """The lines of metrics.jsonl (on disk or in a bucket) up to the resumed step."""
  target = storage.path(path)
  if not target.exists():
    return []
  lines = target.read_text().splitlines(keepends=True)
  return [line for line in lines if line.strip() and json.loads(line)['step'] <= step]


def _truncate_after(path: str, step: int):
  """Drops records past the resumed step: they belong to work that was lost."""
  if os.path.exists(path):
    storage.write_text(path, ''.join(_kept_lines(path, step)))
