"""What a command may replace: one rule for every command that writes a folder.

A command writes one kind of folder (an artefact, an import, a maze dataset,
an evaluation, ...). Before writing, it asks `claim(path, kind, overwrite)`:

  what is at path                     without --overwrite   with --overwrite
  nothing, or an empty folder         written               written
  a folder of the kind it writes      refused (one line)    replaced
  a training run                      refused               refused: never replaced
  another kind, or files it did not   refused               refused
  write (a foreign folder)

A folder's kind is read from the files each command writes (the table in
`KINDS`). Nothing is deleted before the new folder is complete: writers build
it in a temporary sibling of their own and swap it in (`building`), and a
folder another command put at `out` meanwhile is never replaced: the rename
that swaps it in refuses a non-empty target.
"""

import contextlib
import errno
import os
import shutil
import tempfile

from ctm_jax import storage

# kind -> (what it is called in messages, files that mark it: all must be there)
KINDS = {
    'run': ('a training run', ()),  # recognised by `_is_run`
    'artefact': ('an exported artefact', ('model.json', 'forward.jax_export')),
    # its checkpoint alone: an import cut off while replaced (config.json goes first, comes last)
    'import': ('an imported model', ('checkpoint',)),
    'hub_model': ('a model in the Hub format', ('config.json', 'model.safetensors')),
    'mazes': ('a generated maze dataset', ('mazes.json',)),
    'eval': ('an evaluation', ('metrics.json',)),
    'generalisation': ('a maze generalisation report', ('results.json',)),
}
# What a training run holds that no other kind does.
_RUN_MARKS = ('checkpoints', 'metrics.jsonl', 'checksums', 'damaged_checkpoints')
# Files any kind may hold beside its own (the lock of the command that wrote it).
_ANY_KIND = ('.lock',)


def describe(kind: str | None) -> str:
  if kind is None:
    return 'nothing'
  if kind == 'foreign':
    return 'files no ctm_jax command wrote there'
  return KINDS[kind][0]


def kind_of(path: str) -> str | None:
  """The kind of folder at `path`: None when absent or empty, 'foreign' when
  it is not one a command writes (or a file)."""
  p = storage.path(path)
  if p.is_file():
    return 'foreign'
  names = set(storage.names(path)) - set(_ANY_KIND)
  if not names:
    return None
  if names & set(_RUN_MARKS) or any(n.startswith('.lock.') for n in names):
    return 'run'
  for kind, (_, marks) in KINDS.items():
    if marks and all(m in names for m in marks):
      return kind
  return 'foreign'


def claim(path: str, kind: str, overwrite: bool, flag: str = '--out') -> str | None:
  """Raises UsageError (one line naming `flag`, what is there and the fix)
  unless a command writing a `kind` folder may write `path`; returns the
  kind found there (None: nothing to replace)."""
  from ctm_jax import validation  # pylint: disable=g-import-not-at-top  # validation imports interop.hub, a writer

  found = kind_of(path)
  if found is None:
    return None
  if found == kind and overwrite:
    return found
  if found == kind:
    raise validation.UsageError(
        f'{flag}={path} already holds {describe(found)}; pass --overwrite to replace it, or '
        f'choose another {flag}'
    )
  never = ' (--overwrite never replaces one)' if found == 'run' else ''
  only = f'; --overwrite replaces only {describe(kind)}' if overwrite else ''
  raise validation.UsageError(
      f'{flag}={path} holds {describe(found)}{never}{only}; choose another {flag} (an empty or '
      'new folder)'
  )


def scratch(out: str) -> str:
  """A new empty folder beside local `out` that this command owns (unique
  name: a leftover of another run is never reused or deleted)."""
  parent = os.path.dirname(out.rstrip('/')) or '.'
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(prefix=os.path.basename(out.rstrip('/')) + '.tmp-', dir=parent)


def _written_meanwhile(out: str, kind: str, flag: str):
  from ctm_jax import validation  # pylint: disable=g-import-not-at-top

  return validation.UsageError(
      f'{flag}={out}: {describe(kind_of(out))} appeared there while this command wrote '
      f'{describe(kind)} (another command writing the same {flag}?); nothing was replaced; run '
      f'it again, or choose another {flag}'
  )


def swap_in(tmp: str, out: str, replacing: str | None = None, kind: str = '', flag: str = '--out') -> None:
  """Local `tmp` (complete) becomes `out`. `replacing`: what `claim` found
  there. Nothing there then: `out` must still be absent or empty (rename
  refuses anything else, atomically), so two commands writing one `out` never
  replace each other's folder. A `kind` folder then: it is deleted only once
  the new folder is in place, and only if it is still of that kind."""
  if replacing is not None and kind_of(out) not in (None, replacing):
    raise _written_meanwhile(out, kind or replacing, flag)
  old = None
  if replacing is not None and os.path.exists(out):
    old = tempfile.mkdtemp(prefix=os.path.basename(out.rstrip('/')) + '.old-', dir=os.path.dirname(out) or '.')
    os.rmdir(old)
    try:
      os.replace(out, old)
    except FileNotFoundError:  # removed meanwhile: nothing left to replace
      old = None
  try:
    os.rename(tmp, out)  # over nothing or an empty folder only
  except OSError as e:
    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
      raise
    if old is not None and not os.path.exists(out):
      os.replace(old, out)
    raise _written_meanwhile(out, kind or replacing or 'a folder', flag) from None
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def building(out: str, kind: str, overwrite: bool, flag: str = '--out', writes: bool = True):
  """`with building(out, kind, overwrite) as folder:` claims `out` for a
  `kind` folder (UsageError otherwise) and yields the folder to write. On
  disk that is a scratch sibling, swapped in whole when the body ends (and
  deleted, `out` untouched, when it fails). A bucket has no rename: there the
  old `kind` folder is removed and `out` itself is written, its marker file
  last. `writes=False` (a process that writes nothing): the claim only."""
  found = claim(out, kind, overwrite, flag)
  if not writes:
    yield out
    return
  if storage.is_bucket(out):
    if found is not None:
      storage.remove(out)
    yield out
    return
  tmp = scratch(out)
  try:
    yield tmp
    swap_in(tmp, out, found, kind, flag)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
