"""Manifests: the size and CRC of every file a command wrote, checked by
every reader before it trusts the files (bit rot, truncation, a lost file, an
interrupted copy, a tampered artefact).

Training checkpoints (`checksums/<step>.json`, written once a step commits),
exported artefacts and imports (`checksums.json`, written before the file
that marks them complete) all use it. Needs only the standard library and
ctm_jax.storage: the artefact loader uses it without the training code.
"""

import json
import os
import zlib

from ctm_jax import storage

FILE = 'checksums.json'


def file_sums(folder: str, read: bool = False) -> dict[str, list]:
  """Relative path -> [size, crc32] of every file under `folder` (or of the
  file `folder`). In a bucket [size, the object's crc32c] from one listing,
  nothing downloaded, unless `read`: then every object is read and its
  crc32 computed, as on disk."""
  if storage.is_bucket(folder):
    return _read_objects(folder) if read else _object_sums(folder)
  if os.path.isfile(folder):
    return {os.path.basename(folder): _one_sum(folder)}
  sums = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      sums[os.path.relpath(path, folder)] = _one_sum(path)
  return sums


def sum_of(data: bytes) -> list:
  """[size, crc32] of bytes about to be written (a file written after the manifest)."""
  return [len(data), zlib.crc32(data)]


def _one_sum(path: str) -> list:
  crc = 0
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return [os.path.getsize(path), crc]


def _listing(folder: str) -> tuple[str, dict]:
  fs = storage.filesystem(folder)
  prefix = folder.split('://', 1)[1].rstrip('/') + '/'
  try:
    found = fs.find(prefix, detail=True)
  except FileNotFoundError:
    found = {}
  return prefix, {name: info for name, info in found.items() if info.get('type') == 'file'}


def _object_sums(folder: str) -> dict[str, list]:
  prefix, found = _listing(folder)
  return {name[len(prefix):]: [int(info['size']), info.get('crc32c')] for name, info in found.items()}


def _read_objects(folder: str) -> dict[str, list]:
  prefix, found = _listing(folder)
  scheme = folder.split('://', 1)[0]
  names = sorted(found)
  contents = storage.read_many([f'{scheme}://{name}' for name in names])
  return {name[len(prefix):]: sum_of(data) for name, data in zip(names, contents)}


def damage(folder: str, recorded: dict, read: bool = False) -> str | None:
  """How the files under `folder` differ from their recorded sums; None when
  they match. Files not recorded are not checked.

  A file recorded on disk (CRC32, an int) and listed in a bucket (crc32c, a
  string), or the other way round, is checked by size alone: a run copied
  between them is not damaged by the copy."""
  found = file_sums(folder, read)
  missing = sorted(set(recorded) - set(found))
  if missing:
    return f'{len(missing)} file(s) missing, e.g. {missing[0]}'
  for name, (size, crc) in sorted(recorded.items()):
    if found[name][0] != size:
      return f'{name} is {found[name][0]} bytes, {size} when written'
    if type(found[name][1]) is type(crc) and found[name][1] != crc:
      return f'{name} differs from what was written (checksum)'
  return None


def write(folder: str, sums: dict) -> None:
  storage.write_text(storage.join(folder, FILE), json.dumps(sums, indent=0, sort_keys=True))


def check(folder: str, what: str, fix: str) -> None:
  """ValueError (one line: the folder, what differs, `fix`) when the files
  under `folder` differ from its manifest (read in full, in a bucket too);
  a folder written before manifests (none there) passes."""
  path = storage.path(storage.join(folder, FILE))
  if not path.exists():
    return
  try:
    recorded = json.loads(path.read_text())
    if not isinstance(recorded, dict) or not all(
        isinstance(v, list) and len(v) == 2 for v in recorded.values()):
      raise ValueError('not a manifest')
  except (OSError, ValueError) as e:
    raise ValueError(f'{folder}: its {FILE} is unreadable ({e}); {fix}') from None
  reason = damage(folder, recorded, read=True)
  if reason:
    raise ValueError(f'{folder}: {what} is damaged ({reason}); {fix}')
