"""Run paths that may be a bucket: a local path or gs://BUCKET/PATH, one
etils.epath.Path either way (the abstraction orbax and tfds use).

Local paths behave as they always have: absolute, `~` expanded, a file
replaced through a sibling `.tmp` and a rename. A bucket has neither rename
nor append, but an object write is whole or nothing: a file there is
replaced by writing it again, and a reader sees the old object or the new
one, never half of one. gs:// comes with the `gcs` extra (gcsfs, which
brings google-cloud-storage); credentials are Google's application default
ones. `STORAGE_EMULATOR_HOST` (as Google's libraries read it) points every
client at an emulator, TensorStore's checkpoint writes included.
"""

import os

from etils import epath

from ctm_jax import extras

BUCKET_SCHEMES = ('gs://',)


def is_url(path) -> bool:
  return '://' in str(path)


def is_bucket(path) -> bool:
  return str(path).startswith(BUCKET_SCHEMES)


def resolve(path: str, flag: str = '--workdir') -> str:
  """`path` absolute (local) or as given (a bucket URL, trailing / dropped);
  ValueError naming `flag` for a scheme this project does not write."""
  path = str(path)
  if is_bucket(path):
    configure(f'{flag}={path}')
    return path.rstrip('/')
  if is_url(path):
    raise ValueError(
        f'{flag}={path}: only local paths and gs://BUCKET/PATH are supported; mount other '
        'storage and give the mounted path'
    )
  return os.path.abspath(os.path.expanduser(path))


def path(p) -> epath.Path:
  return epath.Path(resolve(p) if not isinstance(p, epath.Path) else p)


def join(base: str, *parts: str) -> str:
  """`base`/`parts`, for a bucket URL as for a local path."""
  if is_url(base):
    return '/'.join([str(base).rstrip('/'), *parts])
  return os.path.join(base, *parts)


_CONFIGURED = []  # set once configure() has succeeded: every bucket path op calls it


def configure(needed_by: str) -> None:
  """The gcs extra present, or MissingExtra naming `needed_by`; TensorStore's
  bucket retries bounded."""
  if _CONFIGURED:
    return
  _name_the_emulator()
  extras.require('gcs', needed_by)
  _bound_checkpoint_retries()
  _CONFIGURED.append(True)


# TensorStore retries a bucket request up to 32 times, up to 32 s apart: a
# bucket that went away would hold a checkpoint save for ~15 minutes. Six,
# up to 16 s apart, give up within a minute (a save then fails in one line
# and the run resumes from the last committed step once storage is back).
GCS_RETRIES = {'max_retries': 6, 'initial_delay': '1s', 'max_delay': '16s'}


def _bound_checkpoint_retries() -> None:
  # Orbax builds every TensorStore context from these defaults (orbax <0.13).
  from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=g-import-not-at-top

  for context in (tensorstore_utils._BASE_TS_CONTEXT, tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):  # pylint: disable=protected-access
    context.setdefault('gcs_request_retries', dict(GCS_RETRIES))


def _name_the_emulator() -> None:
  """An emulator (STORAGE_EMULATOR_HOST) named to TensorStore too, before
  gcsfs or TensorStore first read their settings."""
  emulator = os.environ.get('STORAGE_EMULATOR_HOST')
  if not emulator:
    return
  if not emulator.startswith(('http://', 'https://')):
    emulator = 'http://' + emulator
  os.environ.setdefault('TENSORSTORE_GCS_HTTP_URL', emulator)
  # array_record's reader (tfds data in a bucket) asks Google's C++ client, which reads this.
  os.environ.setdefault('CLOUD_STORAGE_EMULATOR_ENDPOINT', emulator)
  # An emulator takes no credentials; TensorStore would look for some.
  os.environ.setdefault('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'emulator')
  # Nor has it the storage-layout API: gcsfs's probe of it only warns.
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')


_name_the_emulator()


def _fresh_listings() -> None:
  """No cached folder listings for buckets: other processes (TensorStore,
  other workers, the next run) write there, and a stale listing would hide
  a checkpoint or show a deleted one."""
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  for protocol in ('gs', 'gcs'):
    fsspec.config.conf.setdefault(protocol, {})['use_listings_cache'] = False


_fresh_listings()


def write_text(p, text: str) -> None:
  """`p` replaced whole by `text` (see write_bytes)."""
  write_bytes(p, text.encode())


def write_bytes(p, data: bytes) -> None:
  """`p` replaced whole by `data`: readers see the old file or the new one."""
  target = path(p)
  if is_url(target):
    target.write_bytes(data)
    return
  tmp = target.with_name(target.name + '.tmp')
  tmp.write_bytes(data)
  os.replace(tmp, target)


def filesystem(url: str):
  """The fsspec filesystem of a bucket URL."""
  import fsspec  # pylint: disable=g-import-not-at-top

  return fsspec.filesystem(url.split('://', 1)[0])


def copy_up(folder: str, target: str) -> None:
  """Every file under the local `folder` written whole to the same relative
  path under `target` (a bucket folder)."""
  for root, _, files in os.walk(folder):
    for name in files:
      local = os.path.join(root, name)
      with open(local, 'rb') as f:
        write_bytes(join(target, os.path.relpath(local, folder)), f.read())


def move(source: str, target: str) -> None:
  """A file or folder moved; in a bucket, copied then deleted (no rename there)."""
  if is_bucket(source):
    filesystem(source).mv(source, target, recursive=True)
  else:
    os.replace(source, target)


def names(p) -> list[str]:
  """The names in a folder, sorted; [] when it does not exist (a bucket
  has folders only while objects lie under them)."""
  try:
    return sorted(child.name for child in path(p).iterdir())
  except (FileNotFoundError, NotADirectoryError):
    return []


def read_many(paths: list[str]) -> list[bytes]:
  """The bytes of each file; a bucket's are fetched concurrently (one request
  each, many at a time), as a folder of small files in a bucket needs."""
  if paths and is_bucket(paths[0]):
    got = filesystem(paths[0]).cat(list(paths))
    return [got[_key(p)] if _key(p) in got else got[p] for p in paths]
  out = []
  for p in paths:
    with open(p, 'rb') as f:
      out.append(f.read())
  return out


def _key(url: str) -> str:
  return url.split('://', 1)[1]


def files_under(folder: str) -> list[str]:
  """Every file below `folder`, recursively, as full paths (URLs for a
  bucket: one listing), sorted; [] when it does not exist."""
  if is_bucket(folder):
    scheme = folder.split('://', 1)[0]
    fs = filesystem(folder)
    try:
      found = fs.find(folder)
    except FileNotFoundError:
      return []
    return sorted(f'{scheme}://{name}' for name in found)
  return sorted(os.path.join(root, n) for root, _, names in os.walk(folder) for n in names)


def size(p: str) -> int:
  """Bytes of a file, or of every file under a folder."""
  if is_bucket(p):
    return int(filesystem(p).du(p))
  if os.path.isfile(p):
    return os.path.getsize(p)
  return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(p) for n in names)


def remove(p: str) -> None:
  """Every object under a bucket folder removed (a bucket has no folders to delete)."""
  if not is_bucket(p):
    raise ValueError(f'{p}: storage.remove deletes bucket folders only')
  fs = filesystem(p)
  if fs.exists(p):
    fs.rm(p, recursive=True)
