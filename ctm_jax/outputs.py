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
it in a temporary sibling of their own (`scratch`) and swap it in.
"""

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


def swap_in(tmp: str, out: str) -> None:
  """Local `tmp` (complete) becomes `out`; what `claim` allowed to replace
  is deleted only once the new folder is in place beside it."""
  if not os.path.exists(out):
    os.replace(tmp, out)
    return
  old = tempfile.mkdtemp(prefix=os.path.basename(out.rstrip('/')) + '.old-', dir=os.path.dirname(out) or '.')
  os.rmdir(old)
  os.replace(out, old)
  os.replace(tmp, out)
  shutil.rmtree(old, ignore_errors=True)
