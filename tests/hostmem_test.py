"""The huge-page re-exec of the host allocator (ctm_jax/hostmem.py)."""

import os
import subprocess
import sys
import textwrap

import pytest

from ctm_jax import hostmem

_HOSTMEM_PY = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'ctm_jax', 'hostmem.py')

# A child that loads hostmem.py alone (no jax), re-execs, then reports how much
# of a freshly malloc'd and touched 64 MiB block the kernel backed with huge pages.
_CHILD = textwrap.dedent(f"""
    import ctypes, importlib.util, os
    spec = importlib.util.spec_from_file_location('hostmem', {_HOSTMEM_PY!r})
    hostmem = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hostmem)
    print('start', flush=True)
    hostmem.reexec_with_huge_pages()

    def anon_huge_kib():
      with open('/proc/self/smaps_rollup') as f:
        return sum(int(l.split()[1]) for l in f if l.startswith('AnonHugePages:'))

    size = 64 << 20
    before = anon_huge_kib()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    print('huge_kib', anon_huge_kib() - before)
    print('status', hostmem.status())
    print('before', repr(hostmem.environ_before_reexec().get('GLIBC_TUNABLES')))
""")


def _run_child(**env):
  """(times the child started, KiB of huge pages in its block, status, fields)."""
  full_env = {
      k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', hostmem.OPT_OUT_ENV)
  }
  full_env.update(env)
  out = subprocess.run(
      [sys.executable, '-c', _CHILD], env=full_env, capture_output=True, text=True, check=True
  ).stdout
  lines = out.splitlines()
  fields = dict(line.split(' ', 1) for line in lines if not line.startswith('start'))
  return lines.count('start'), int(fields['huge_kib']), fields['status'], fields


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert hostmem.thp_mode(str(path)) == 'madvise'
  path.write_text('[always] madvise never\n')
  assert hostmem.thp_mode(str(path)) == 'always'
  assert hostmem.thp_mode(str(tmp_path / 'missing')) is None


def test_with_tunable_keeps_other_tunables_and_replaces_hugetlb():
  assert hostmem.with_tunable('') == 'glibc.malloc.hugetlb=1'
  assert (
      hostmem.with_tunable('glibc.malloc.hugetlb=0:glibc.malloc.tcache_count=0')
      == 'glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1'
  )


@pytest.mark.parametrize(
    'environ, mode, glibc, expected',
    [
        ({}, 'madvise', (2, 36), None),
        ({'CTM_JAX_HUGE_PAGES': '0'}, 'madvise', (2, 36), 'CTM_JAX_HUGE_PAGES=0'),
        ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, 'madvise', (2, 36), 'already sets'),
        ({}, 'madvise', (2, 31), 'needs glibc >= 2.35'),
        ({}, 'madvise', None, 'needs glibc >= 2.35'),
        ({}, 'always', (2, 36), "'always'"),
        ({}, 'never', (2, 36), "'never'"),
        ({}, None, (2, 36), 'None'),
    ],
)
def test_reason_not_to_reexec(environ, mode, glibc, expected):
  reason = hostmem.reason_not_to_reexec(environ, mode, glibc)
  if expected is None:
    assert reason is None
  else:
    assert expected in reason


def test_environ_before_reexec_restores_the_users_tunables(monkeypatch):
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1')
  monkeypatch.setenv('CTM_JAX_GLIBC_TUNABLES_BEFORE', '')
  env = hostmem.environ_before_reexec()
  assert 'GLIBC_TUNABLES' not in env and 'CTM_JAX_GLIBC_TUNABLES_BEFORE' not in env
  monkeypatch.setenv('CTM_JAX_GLIBC_TUNABLES_BEFORE', 'glibc.malloc.tcache_count=0')
  assert hostmem.environ_before_reexec()['GLIBC_TUNABLES'] == 'glibc.malloc.tcache_count=0'
  monkeypatch.delenv('CTM_JAX_GLIBC_TUNABLES_BEFORE')  # no re-exec: environment as is
  assert hostmem.environ_before_reexec()['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'


def _reexec_possible():
  return hostmem.reason_not_to_reexec({}, hostmem.thp_mode(), hostmem.glibc_version())


@pytest.mark.skipif(
    _reexec_possible() is not None,
    reason=f'this machine would not re-exec: {_reexec_possible()}',
)
def test_reexec_gives_malloc_huge_pages_once():
  starts, huge_kib, status, fields = _run_child()
  assert starts == 2  # the original process and its one re-exec, no loop
  assert huge_kib >= 32 << 10, huge_kib
  assert status.startswith('huge pages on')
  assert fields['before'] == 'None'  # children can get the user's environment back

  starts, huge_kib, status, fields = _run_child(GLIBC_TUNABLES='glibc.malloc.tcache_count=0')
  assert (starts, fields['before']) == (2, "'glibc.malloc.tcache_count=0'")
  assert huge_kib >= 32 << 10, huge_kib

  starts, huge_kib, status, _ = _run_child(CTM_JAX_HUGE_PAGES='0')
  assert starts == 1
  assert huge_kib < 8 << 10, huge_kib  # 4 KiB pages: the cost hostmem removes
  assert status == 'huge pages off (CTM_JAX_HUGE_PAGES=0)'
