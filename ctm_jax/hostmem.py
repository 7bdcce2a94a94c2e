"""Huge pages for the host allocator, which XLA's CPU runtime allocates through.

On CPU every train step allocates its large buffers afresh (the tick scan's
per-tick residuals reach hundreds of MB: parity at batch 64 stacks a 491 MB
trace), and glibc serves each one with a new `mmap`. Touching those pages
faults them in 4 KiB at a time, every step: about a sixth of a parity train
step at batch 64 on a 2-core VM (benchmarks/model_bench.py, README "Performance"). glibc
>= 2.35 can ask for transparent huge pages on its mappings (tunable
`glibc.malloc.hugetlb=1`), which kernels in THP 'madvise' mode honour, so the
same memory faults in 2 MiB at a time.

glibc reads its tunables once, when the process starts, so an entry point
calls `reexec_with_huge_pages()` first: when the tunable would help and is not
set yet, the process replaces itself (`execve`, same pid, argv and
environment) with one that has it. `CTM_JAX_HUGE_PAGES=0` turns this off.
"""

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb'
OPT_OUT_ENV = 'CTM_JAX_HUGE_PAGES'
# GLIBC_TUNABLES as it was before the re-exec ('' when unset), for children
# that should run with the environment the user gave (benchmarks' reference).
_BEFORE_ENV = 'CTM_JAX_GLIBC_TUNABLES_BEFORE'
_THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'
_MIN_GLIBC = (2, 35)


def thp_mode(path: str = _THP_MODE_FILE) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never')."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  # The file lists every mode and brackets the active one: "always [madvise] never".
  start, end = text.find('['), text.find(']')
  return text[start + 1 : end] if 0 <= start < end else None


def glibc_version() -> tuple[int, ...] | None:
  name, version = platform.libc_ver()
  if name != 'glibc' or not version:
    return None
  return tuple(int(part) for part in version.split('.') if part.isdigit())


def with_tunable(tunables: str) -> str:
  """`tunables` (GLIBC_TUNABLES' colon-separated value) plus hugetlb=1."""
  kept = [t for t in tunables.split(':') if t and t.partition('=')[0] != TUNABLE]
  return ':'.join(kept + [f'{TUNABLE}=1'])


def reason_not_to_reexec(
    environ: os._Environ | dict[str, str], mode: str | None, glibc: tuple[int, ...] | None
) -> str | None:
  """Why this process should keep its allocator as it is; None: re-exec."""
  if environ.get(OPT_OUT_ENV, '1') == '0':
    return f'{OPT_OUT_ENV}=0'
  if TUNABLE in environ.get('GLIBC_TUNABLES', ''):
    return f'GLIBC_TUNABLES already sets {TUNABLE}'
  if glibc is None or glibc < _MIN_GLIBC:
    return f'needs glibc >= {".".join(map(str, _MIN_GLIBC))}, found {glibc}'
  if mode != 'madvise':
    # 'always' already gives huge pages; 'never' (or no THP) cannot.
    return f"transparent huge pages are {mode!r}, not 'madvise'"
  return None


def reexec_with_huge_pages() -> None:
  """Restarts this process with `glibc.malloc.hugetlb=1` when that helps.

  Returns only when no restart is needed; call it before any work, from the
  `__main__` block of a command-line entry point (never from library code or
  an interactive session).
  """
  if reason_not_to_reexec(os.environ, thp_mode(), glibc_version()) is not None:
    return
  before = os.environ.get('GLIBC_TUNABLES', '')
  env = dict(os.environ, GLIBC_TUNABLES=with_tunable(before), **{_BEFORE_ENV: before})
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv keeps the interpreter's own options (-m module, -X, -u).
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def environ_before_reexec() -> dict[str, str]:
  """This process's environment without what `reexec_with_huge_pages` added."""
  env = dict(os.environ)
  if _BEFORE_ENV in env:
    before = env.pop(_BEFORE_ENV)
    if before:
      env['GLIBC_TUNABLES'] = before
    else:
      env.pop('GLIBC_TUNABLES', None)
  return env


def status() -> str:
  """One line for the run log: whether large allocations get huge pages."""
  mode = thp_mode()
  tunable_set = f'{TUNABLE}=1' in os.environ.get('GLIBC_TUNABLES', '')
  if mode == 'always' or (mode == 'madvise' and tunable_set):
    return f'huge pages on (THP {mode!r}' + (f', {TUNABLE}=1)' if tunable_set else ')')
  if tunable_set:
    return f'huge pages off (THP {mode!r})'
  return f'huge pages off ({reason_not_to_reexec(os.environ, mode, glibc_version())})'
