"""Hostile conditions: two trainers on one workdir, a killed lock holder."""

import contextlib
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from conftest import one_error_line
from ctm_jax import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
_TIMEOUT = 300


def _main(workdir, *overrides, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen):
  """`python -m ctm_jax.main` on the smoke config. A long run must send stderr to a
  file: an unread pipe fills with progress output and stalls it."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  command = [
      sys.executable,
      '-m',
      'ctm_jax.main',
      '--config=configs/parity.py:smoke',
      f'--workdir={workdir}',
      *overrides,
  ]
  return subprocess.Popen(
      command, cwd=REPO, env=env, stdout=stdout, stderr=stderr, text=True, **popen
  )


def _wait_for(predicate, proc, what, timeout=_TIMEOUT):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      pytest.fail(f'{what}: the process exited first ({proc.returncode})')
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f'{what}: not within {timeout} s')
    time.sleep(0.2)


def test_lock_refuses_a_second_holder_naming_the_first(tmp_path):
  with workdir_lib.Lock(str(tmp_path)):
    info = json.loads((tmp_path / '.lock').read_text())
    assert info['pid'] == os.getpid()
    with pytest.raises(workdir_lib.WorkdirInUse, match=rf'in use by another run \(pid {os.getpid()} '):
      with workdir_lib.Lock(str(tmp_path)):
        pass
    # Another process index of the same run takes its own lock.
    with workdir_lib.Lock(str(tmp_path), process_index=1):
      pass
  with workdir_lib.Lock(str(tmp_path)):  # released on exit
    pass


def test_lock_left_by_a_dead_process_is_taken(tmp_path):
  """A lock file of a crashed run (pid gone) does not block; nor does a SIGKILLed holder."""
  (tmp_path / '.lock').write_text(json.dumps({'pid': 2**22 + 7, 'host': 'x', 'started': 'then'}))
  with workdir_lib.Lock(str(tmp_path)):
    pass
  holder = subprocess.Popen(
      [
          sys.executable,
          '-c',
          'import sys, time\n'
          'from ctm_jax import workdir\n'
          'with workdir.Lock(sys.argv[1]):\n'
          '  print("held", flush=True)\n'
          '  time.sleep(600)\n',
          str(tmp_path),
      ],
      cwd=REPO,
      stdout=subprocess.PIPE,
      text=True,
  )
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(workdir_lib.WorkdirInUse, match=f'pid {holder.pid} '):
      with workdir_lib.Lock(str(tmp_path)):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir_lib.Lock(str(tmp_path)):
    pass


@pytest.mark.slow  # over 10 s: the slow tier (CI runs it after the default suite)
def test_second_trainer_on_a_workdir_exits_at_once_and_the_first_is_untouched(tmp_path):
  workdir = tmp_path / 'run'
  log = open(tmp_path / 'first.log', 'w')
  first = _main(
      workdir,
      '--config.training_iterations=100000',
      '--config.log_every=5',
      stdout=subprocess.DEVNULL,
      stderr=log,
  )
  try:
    metrics = workdir / 'metrics.jsonl'
    _wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, first, 'first run logging')
    config_before = (workdir / 'config.json').read_text()
    second = _main(workdir, '--config.training_iterations=50')
    out, err = second.communicate(timeout=_TIMEOUT)
    assert second.returncode == 2, err
    line = one_error_line(err)
    assert f'--workdir={workdir} is in use by another run (pid {first.pid} ' in line
    assert first.poll() is None  # still training
    assert (workdir / 'config.json').read_text() == config_before
  finally:
    first.send_signal(signal.SIGTERM)  # checkpoints and exits
    first.wait(timeout=_TIMEOUT)
    log.close()
  assert first.returncode == 0, (tmp_path / 'first.log').read_text()[-3000:]
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  assert train_steps == sorted(set(train_steps)), train_steps  # one run's lines only


def _assert_stopped_in_one_line(proc, err, what):
  """Exit 1 with one `ctm_jax.main:` line, the last of the output, that says `what`."""
  assert proc.returncode == 1, err[-3000:]
  last = one_error_line(err)
  assert err.strip().splitlines()[-1] == last, err[-3000:]
  assert what in last, last
  return last


def _committed(workdir) -> list[int]:
  directory = workdir / 'checkpoints'
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def _limit_file_size(limit):
  import resource  # pylint: disable=g-import-not-at-top

  def preexec():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

  return preexec


@pytest.mark.slow  # over 10 s: the slow tier (CI runs it after the default suite)
def test_full_disk_stops_the_run_in_one_line_and_keeps_checkpoints(tmp_path):
  """Every file the trainer writes is capped (RLIMIT_FSIZE, as a full disk would cap it):
  the run ends promptly with one line naming the file or checkpoint, the step and
  the newest committed checkpoint, which still restores."""
  workdir = tmp_path / 'run'
  flags = ('--config.save_every=7', '--config.log_every=1', '--config.track_every=100000')
  # Checkpoints committed before the disk fills (a checkpoint of this model is
  # close to the cap, so the capped run alone may fail on its first save).
  _, err = _main(workdir, *flags, '--config.training_iterations=14').communicate(timeout=_TIMEOUT)
  assert _committed(workdir) == [7, 14], err[-3000:]
  proc = _main(
      workdir,
      *flags,
      '--config.training_iterations=100000',
      stdout=subprocess.DEVNULL,
      preexec_fn=_limit_file_size(32 * 1024),
  )
  try:
    _, err = proc.communicate(timeout=_TIMEOUT)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail('the run did not stop on a full disk')
  last = _assert_stopped_in_one_line(proc, err, 'step ')
  assert 'File too large' in last or 'No space' in last, last
  assert 'rerun the same command' in last
  steps = _committed(workdir)
  assert steps and steps[-1] >= 14, steps
  if 'saving checkpoint' in last:
    assert f'step {steps[-1]}, is intact' in last, last
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  restored = ocp.PyTreeCheckpointer().restore(str(workdir / 'checkpoints' / str(steps[-1]) / 'state'))
  assert int(restored['step']) == steps[-1]


@contextlib.contextmanager
def _tmpfs(path, size, read_only=False):
  """A tmpfs of `size` mounted at `path` for the body, unmounted after; skips the
  test, saying why, where one cannot be mounted (not root, no mount rights)."""
  if os.geteuid() != 0:
    pytest.skip('needs root to mount a tmpfs')
  path.mkdir()
  options = f'size={size}' + (',ro' if read_only else '')
  result = subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)], capture_output=True, text=True
  )
  if result.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {result.stderr.strip()}')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', str(path)], check=False)


def test_tiny_filesystem_stops_the_run_in_one_line(tmp_path):
  """The reported situation: a 1.1 MB tmpfs workdir, a save every 7 steps."""
  with _tmpfs(tmp_path / 'tiny', '1100k') as mount:
    proc = _main(
        mount / 'run',
        '--config.training_iterations=300',
        '--config.save_every=7',
        '--config.log_every=1',
        '--config.track_every=100',
        stdout=subprocess.DEVNULL,
    )
    try:
      _, err = proc.communicate(timeout=_TIMEOUT)
    except subprocess.TimeoutExpired:
      proc.kill()
      pytest.fail('the run hung on a full filesystem')
    last = _assert_stopped_in_one_line(proc, err, 'step ')
    assert 'No space left on device' in last, last


def _children(pid) -> set[int]:
  out = subprocess.run(['ps', '-o', 'pid=', '--ppid', str(pid)], capture_output=True, text=True)
  return {int(p) for p in out.stdout.split()}


def _alive(pid) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split()[2] != 'Z'
  except FileNotFoundError:
    return False


@pytest.mark.slow  # over 10 s: the slow tier (CI runs it after the default suite)
def test_data_workers_die_with_a_killed_trainer(tmp_path):
  workdir = tmp_path / 'run'
  trainer = _main(
      workdir,
      '--config.num_workers_train=2',
      '--config.training_iterations=100000',
      '--config.log_every=5',
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  metrics = workdir / 'metrics.jsonl'
  _wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, trainer, 'training')
  # The workers and their descendants (grain's, multiprocessing's resource tracker).
  family, frontier = set(), {trainer.pid}
  while frontier:
    frontier = set().union(*(_children(p) for p in frontier)) - family
    family |= frontier
  assert len(family) >= 2, family
  trainer.send_signal(signal.SIGKILL)
  trainer.wait()
  deadline = time.monotonic() + 20
  while any(_alive(p) for p in family) and time.monotonic() < deadline:
    time.sleep(0.2)
  left = [p for p in family if _alive(p)]
  for p in left:
    os.kill(p, signal.SIGKILL)
  assert not left, f'processes outlived their SIGKILLed trainer: {left}'


def test_read_only_mount_is_one_line_exit_2(tmp_path):
  with _tmpfs(tmp_path / 'ro', '1m', read_only=True) as mount:
    proc = _main(mount / 'run', stdout=subprocess.DEVNULL)
    _, err = proc.communicate(timeout=_TIMEOUT)
    assert proc.returncode == 2, err[-3000:]
    line = one_error_line(err)
    assert f'--workdir={mount / "run"}: cannot create it (Read-only file system)' in line


def test_save_error_names_the_newest_committed_step_or_that_there_is_none(tmp_path):
  from ctm_jax import checkpoint  # pylint: disable=g-import-not-at-top

  directory = tmp_path / 'checkpoints'
  directory.mkdir()
  full = OSError(errno.ENOSPC, 'No space left on device')
  message = str(checkpoint.SaveError(str(directory), 7, full))
  assert 'No space left on device' in message
  assert 'no checkpoint had been committed there yet' in message
  for name in ('7', '14', '21.orbax-checkpoint-tmp'):
    (directory / name).mkdir()
  message = str(checkpoint.SaveError(str(directory), 21, full))
  assert 'saving checkpoint step 21' in message
  assert 'step 14, is intact' in message
