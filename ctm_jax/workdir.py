"""The run directory: created and checked, then locked for one trainer at a time.

The lock is an exclusive `flock` on `<workdir>/.lock` (process i > 0 of a
multi-process run: `.lock.<i>`), held for the whole run. The kernel releases
it when the holder exits in any way, SIGKILL included, so a lock is never
stale; the file keeps the holder's pid, host and start time for the message
a second trainer gets. The file is never deleted: removing it could let two
runs hold locks on different files of one path.
"""

import datetime
import fcntl
import json
import os
import socket

from absl import logging

from ctm_jax import validation


class WorkdirInUse(validation.UsageError):
  """Another trainer holds the workdir."""


def prepare(workdir: str) -> str:
  """The absolute workdir, created if needed; UsageError if it cannot be used."""
  if '://' in workdir:
    raise validation.UsageError(
        f'--workdir={workdir}: URLs are not supported yet; mount the bucket on every host '
        '(e.g. gcsfuse) and give the mounted path'
    )
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise validation.UsageError(
        f'--workdir={workdir}: cannot create it ({e.strerror}); pass a directory you can write'
    ) from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise validation.UsageError(
        f'--workdir={workdir}: not writable; pass a directory you can write'
    )
  return workdir


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Lock:
  """`with Lock(workdir, process_index):` runs the body as the workdir's only trainer."""

  def __init__(self, workdir: str, process_index: int = 0):
    name = '.lock' if process_index == 0 else f'.lock.{process_index}'
    self.workdir = workdir
    self.path = os.path.join(workdir, name)
    self._fd = None

  def _holder(self, fd) -> str:
    try:
      info = json.loads(os.pread(fd, 4096, 0).decode() or '{}')
    except (OSError, ValueError):
      info = {}
    if not info:
      return 'holder unknown'
    text = f'pid {info.get("pid")} on {info.get("host")}, started {info.get("started")}'
    if info.get('host') == socket.gethostname() and not _alive(int(info.get('pid', 0))):
      # fork()ed children share the lock: the trainer died, something it started lives on.
      text += '; that process has exited but a process it started still holds the lock'
    return text

  def __enter__(self):
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._holder(fd)
      os.close(fd)
      raise WorkdirInUse(
          f'--workdir={self.workdir} is in use by another run ({holder}); wait for it to '
          'finish, stop it, or pass another --workdir'
      ) from None
    except OSError as e:  # e.g. ENOLCK: a network filesystem without locks
      os.close(fd)
      logging.warning(
          'Cannot lock %s (%s): a second run on this workdir would not be refused',
          self.path,
          e.strerror,
      )
      return self
    info = {
        'pid': os.getpid(),
        'host': socket.gethostname(),
        'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      os.close(self._fd)  # releases the flock
      self._fd = None
