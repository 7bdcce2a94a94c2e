"""The run directory: created and checked, then locked for one trainer at a time.

On disk the lock is an exclusive `flock` on `<workdir>/.lock` (process i > 0
of a multi-process run: `.lock.<i>`), held for the whole run. The kernel
releases it when the holder exits in any way, SIGKILL included, so a lock is
never stale; the file keeps the holder's pid, host and start time for the
message a second trainer gets. The file is never deleted: removing it could
let two runs hold locks on different files of one path.

In a bucket (gs://) there is no flock: the lock is the object `.lock`,
created only if absent (generation precondition 0), rewritten every
LOCK_EXPIRY_S / 4 while the run lives (precondition: the generation it last
wrote) and deleted when it ends. A lock not rewritten for LOCK_EXPIRY_S (its
holder was killed), or whose holder was a process of this host that has
exited, is taken over by the next run, said in the log.
"""

import datetime
import fcntl
import json
import os
import socket
import threading

from absl import logging

from ctm_jax import storage
from ctm_jax import validation

# Seconds a bucket lock lives without a refresh: a killed run's lock blocks a
# restart for at most this long.
LOCK_EXPIRY_S = 120.0
# Seconds the lock's requests retry when taking it and when letting it go.
ACQUIRE_S, RELEASE_S = 30.0, 10.0


class WorkdirInUse(validation.UsageError):
  """Another trainer holds the workdir."""


def prepare(workdir: str) -> str:
  """The absolute workdir, created if needed; UsageError if it cannot be used."""
  try:
    workdir = storage.resolve(workdir)
  except ValueError as e:
    raise validation.UsageError(str(e)) from None
  if storage.is_bucket(workdir):
    return workdir  # a bucket has no folders to create; the lock shows it is writable
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


def Lock(workdir: str, process_index: int = 0):  # pylint: disable=invalid-name
  """`with Lock(workdir, process_index):` runs the body as the workdir's only trainer."""
  if storage.is_bucket(workdir):
    return BucketLock(workdir, process_index)
  return FileLock(workdir, process_index)


class FileLock:
  """The lock of a local workdir: flock (see the module's docstring)."""

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


def _now() -> datetime.datetime:
  return datetime.datetime.now(datetime.timezone.utc)


class BucketLock:
  """The lock of a gs:// workdir: an object with generation preconditions
  (see the module's docstring)."""

  def __init__(self, workdir: str, process_index: int = 0, expiry_s: float | None = None):
    bucket, _, prefix = workdir[len('gs://'):].partition('/')
    name = '.lock' if process_index == 0 else f'.lock.{process_index}'
    self.workdir, self.bucket_name = workdir, bucket
    self.object_name = f'{prefix}/{name}' if prefix else name
    self.expiry_s = LOCK_EXPIRY_S if expiry_s is None else expiry_s
    self._generation = None
    self._stop = threading.Event()
    self._thread = None

  @staticmethod
  def _patience(seconds: float) -> dict:
    """A request's retries bounded by `seconds` (the library's default is
    120 s per call): storage that went away ends the run, not hangs it."""
    from google.cloud.storage import retry  # pylint: disable=g-import-not-at-top

    return {'retry': retry.DEFAULT_RETRY.with_timeout(seconds), 'timeout': min(seconds, 60.0)}

  def _blob(self):
    from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top

    return gcs.Client().bucket(self.bucket_name).blob(self.object_name)

  def _info(self) -> str:
    return json.dumps({
        'pid': os.getpid(),
        'host': socket.gethostname(),
        'started': self._started,
        'expiry_s': self.expiry_s,
    })

  def __enter__(self):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    self._started = _now().isoformat(timespec='seconds')
    try:
      blob = self._blob()
      for attempt in range(2):
        try:
          blob.upload_from_string(self._info(), if_generation_match=0, **self._patience(ACQUIRE_S))
          break
        except exceptions.PreconditionFailed:
          if attempt or not self._take_over_if_stale(blob):
            raise WorkdirInUse(
                f'--workdir={self.workdir} is in use by another run ({self._holder(blob)}); wait '
                'for it to finish, stop it, or pass another --workdir'
            ) from None
    except exceptions.NotFound:
      raise validation.UsageError(
          f'--workdir={self.workdir}: no bucket gs://{self.bucket_name}; create it '
          f'(gcloud storage buckets create gs://{self.bucket_name}) or pass another --workdir'
      ) from None
    except exceptions.Forbidden as e:
      raise validation.UsageError(
          f'--workdir={self.workdir}: cannot write gs://{self.bucket_name} ({e.message}); '
          'log in with application default credentials that may write it'
      ) from None
    except exceptions.GoogleAPIError as e:
      raise validation.UsageError(f'--workdir={self.workdir}: cannot reach the bucket ({e})') from None
    except OSError as e:  # no route to the storage service
      raise validation.UsageError(f'--workdir={self.workdir}: cannot reach the bucket ({e})') from None
    self._generation = blob.generation
    self._thread = threading.Thread(target=self._refresh, args=(blob,), name='workdir-lock', daemon=True)
    self._thread.start()
    return self

  def _holder(self, blob) -> str:
    try:
      blob.reload(**self._patience(ACQUIRE_S))
      info = json.loads(blob.download_as_bytes(**self._patience(ACQUIRE_S)).decode() or '{}')
      refreshed = blob.updated.isoformat(timespec='seconds') if blob.updated else '?'
    except Exception:  # pylint: disable=broad-except  # only for the message
      return 'holder unknown'
    return (
        f'pid {info.get("pid")} on {info.get("host")}, started {info.get("started")}, lock '
        f'refreshed {refreshed}; a lock not refreshed for {self.expiry_s:.0f} s is taken over'
    )

  def _take_over_if_stale(self, blob) -> bool:
    """Deletes the lock if its holder stopped refreshing it; True when it did."""
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    try:
      blob.reload(**self._patience(ACQUIRE_S))
    except exceptions.NotFound:
      return True  # released meanwhile
    age = (_now() - blob.updated).total_seconds() if blob.updated else 0.0
    try:
      info = json.loads(blob.download_as_bytes(**self._patience(ACQUIRE_S)).decode() or '{}')
    except Exception:  # pylint: disable=broad-except  # unreadable: the expiry decides
      info = {}
    # A holder on this host whose process has exited is gone now, not after the expiry.
    exited = info.get('host') == socket.gethostname() and not _alive(int(info.get('pid') or 0))
    if age <= self.expiry_s and not exited:
      return False
    try:
      blob.delete(if_generation_match=blob.generation, **self._patience(ACQUIRE_S))
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      return False  # another run took it, or its holder refreshed it meanwhile
    logging.warning(
        'Took over the lock of %s: %s, so its run is gone', self.workdir,
        f'its holder, pid {info.get("pid")} on this host, has exited' if exited
        else f'not refreshed for {age:.0f} s (more than {self.expiry_s:.0f} s)',
    )
    return True

  def _refresh(self, blob):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    while not self._stop.wait(self.expiry_s / 4):
      try:
        blob.upload_from_string(
            self._info(), if_generation_match=self._generation, **self._patience(self.expiry_s / 4))
        self._generation = blob.generation
      except exceptions.PreconditionFailed:
        logging.error(
            'The lock of %s was taken over by another run (this one did not refresh it for '
            '%.0f s); stop one of them', self.workdir, self.expiry_s,
        )
        return
      except Exception as e:  # pylint: disable=broad-except  # storage away: retried
        logging.warning('Cannot refresh the lock of %s (%s); retrying', self.workdir, e)

  def __exit__(self, *exc):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._generation is not None:
      try:
        self._blob().delete(if_generation_match=self._generation, **self._patience(RELEASE_S))
      except (exceptions.GoogleAPIError, OSError):
        pass  # gone or taken over: nothing of ours to release
      self._generation = None
