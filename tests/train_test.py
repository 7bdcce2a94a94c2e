"""End to end: `train_and_evaluate` and `python -m ctm_jax.main` on the parity smoke config.

Covers what a run leaves in its workdir, exact resume after SIGKILL and after
SIGTERM (bit-identical to an uninterrupted run), a save killed half way,
config validation before anything is written, and non-finite losses.

A subprocess run costs ~5 s to start and ~15 s to compile on a 2-core CPU, so
the resume runs share one module fixture, a compilation cache, and the CPU.
"""

import functools
import glob
import json
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import one_error_line
from ctm_jax.analysis import plots
from ctm_jax import checkpoint
from ctm_jax.configs import parity
from ctm_jax.data import parity as parity_data
from ctm_jax.data import pipeline
from ctm_jax import optim
from ctm_jax import steps
from ctm_jax import tasks
from ctm_jax import train
from ctm_jax import validation

# grain worker processes read absl flags; tests do not parse a command line.
flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parents[1]
# Seconds any one subprocess may take before the test gives up on it.
_TIMEOUT = 300


# ---------------------------------------------------------------------------
# Helpers.


def _smoke(**overrides):
  """The smoke config with dotted overrides, e.g. `_smoke(**{'model.d_model': 64})`."""
  config = parity.get_config('smoke')
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split('.')
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def _launch(workdir, *overrides, log=None, compilation_cache=None):
  """`python -m ctm_jax.main` on the smoke config; output goes to `log` (a file).

  `compilation_cache`: a JAX persistent compilation cache directory; a later run
  that compiles the same programs loads them instead (~15 s saved).
  """
  log = log or f'{workdir}.log'
  # Two devices: a sharded run, at a fraction of eight's cost on a 2-core CI machine.
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  if compilation_cache:
    env['JAX_COMPILATION_CACHE_DIR'] = str(compilation_cache)
  command = [
      sys.executable,
      '-m',
      'ctm_jax.main',
      '--config=configs/parity.py:smoke',
      f'--workdir={workdir}',
      *overrides,
  ]
  with open(log, 'a') as f:  # the child keeps its own descriptor
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def _read(path) -> str:
  return pathlib.Path(path).read_text(errors='replace')


def _committed_steps(workdir) -> list[int]:
  """Finalised checkpoint steps (orbax renames a save's tmp directory when done)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _wait(proc, log, timeout=_TIMEOUT) -> int:
  try:
    return proc.wait(timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    pytest.fail(f'{proc.args} ran past {timeout} s; log:\n{_read(log)[-3000:]}')


def _restore_raw(workdir, step) -> dict:
  """The `state` item of a checkpoint as NumPy arrays, without an abstract target."""
  ckpt = checkpoint.Checkpointer(workdir, keep=100)
  try:
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    ckpt.close()
  return jax.tree.map(np.asarray, restored['state'])


def _restore_like_trainer(config, workdir, step):
  """(TrainState, data iterator) restored as train_and_evaluate restores them."""
  task = validation.validate(config)
  model = task.make_model(config)
  tx = optim.make_optimizer(config)
  example = task.model_inputs(task.example_batch(config))
  abstract_state = jax.eval_shape(
      lambda: steps.init_state(model, tx, jax.random.key(config.seed), example)
  )
  loader = pipeline.make_train_loader(
      task.train_source(config), batch_size=config.batch_size, seed=config.seed
  )
  iterator = iter(loader)
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  try:
    state = ckpt.restore(step, abstract_state, iterator)
  finally:
    ckpt.close()
  return state, iterator


def _assert_trees_equal(actual, expected, what):
  """Same structure, dtypes and bits on every leaf."""
  flat_a, tree_a = jax.tree.flatten_with_path(actual)
  flat_e, tree_e = jax.tree.flatten_with_path(expected)
  assert tree_a == tree_e, f'{what}: tree structures differ\n{tree_a}\n{tree_e}'
  for (path, a), (_, e) in zip(flat_a, flat_e):
    a, e = np.asarray(a), np.asarray(e)
    name = f'{what}{jax.tree_util.keystr(path)}'
    assert (
        a.dtype == e.dtype and a.shape == e.shape
    ), f'{name}: {a.dtype}{a.shape} != {e.dtype}{e.shape}'
    assert np.array_equal(a, e), f'{name}: max |diff| {np.max(np.abs(a.astype(float) - e)):.3g}'


def _records(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def _scalars(workdir, name) -> dict[int, float]:
  """step -> value of one scalar in metrics.jsonl (each step written at most once)."""
  out = {}
  for record in _records(workdir):
    if name in record:
      assert record['step'] not in out, f'{name} written twice at step {record["step"]}'
      out[record['step']] = record[name]
  return out


def _tensorboard_tags(directory) -> dict[str, list[int]]:
  """tag -> steps of the scalars in TensorBoard event files (TFRecord of Event protos)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  tags = {}
  for path in sorted(glob.glob(os.path.join(directory, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset : offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4  # length, its crc, payload, payload crc
      for value in event.summary.value:
        tags.setdefault(value.tag, []).append(event.step)
  return tags


def _tree_snapshot(directory) -> dict[str, tuple[int, int]]:
  """relative path -> (size, mtime_ns) of every file below `directory` but the
  workdir lock (each start records its pid there; it is not run data)."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      if name.startswith('.lock'):
        continue
      path = os.path.join(root, name)
      stat = os.stat(path)
      out[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns)
  return out


# ---------------------------------------------------------------------------
# 1. End to end, in process.


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """(config, workdir, returned state) of one in-process smoke run."""
  config = _smoke()
  workdir = tmp_path_factory.mktemp('smoke') / 'run'
  state = train.train_and_evaluate(config, str(workdir))
  return config, workdir, state


def test_end_to_end_smoke_run(smoke_run):
  config, workdir, state = smoke_run
  total, ticks = config.training_iterations, config.model.iterations
  assert int(state.step) == total

  # Checkpoints every save_every steps; the last one is the returned state.
  assert _committed_steps(workdir) == [20, 40, 60]
  assert not glob.glob(os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*'))
  restored, _ = _restore_like_trainer(config, workdir, total)
  _assert_trees_equal(restored, state, 'checkpoint 60 vs returned state')

  # config.json is the resolved config.
  written = json.loads((workdir / 'config.json').read_text())
  assert written == json.loads(config.to_json_best_effort())

  # metrics.jsonl: train scalars every log_every steps, eval every track_every.
  train_loss = _scalars(workdir, 'train/loss')
  assert sorted(train_loss) == list(range(10, total + 1, 10))
  eval_steps = [r['step'] for r in _records(workdir) if 'eval/loss' in r]
  assert eval_steps == [30, 60]
  train_keys = {'train/loss', 'train/acc_most_certain', 'train/acc_last', 'train/grad_norm'}
  train_keys |= {'train/lr', 'train/steps_per_s', 'train/most_certain_tick'}
  eval_keys = {'eval/loss', 'eval/acc_most_certain', 'eval/acc_last', 'eval/certainty_last'}
  eval_keys |= {f'eval/acc_tick_{t}' for t in range(ticks)}
  for record in _records(workdir):
    keys = set(record) - {'step'}
    prefix = 'train' if 'train/loss' in record else 'eval'
    assert all(k.startswith(prefix + '/') for k in keys), record
    assert keys >= (train_keys if prefix == 'train' else eval_keys), record
    assert f'{prefix}/acc_tick_{ticks}' not in keys
    assert all(np.isfinite(v) for v in record.values()), record
    accuracies = [v for k, v in record.items() if '/acc_' in k]
    assert all(0.0 <= a <= 1.0 for a in accuracies), record

  # The loss goes down: last logged window below the first (seed 0 on CPU:
  # 0.694 -> 0.679; seeds 0-5 all decrease, by 0.004-0.015). A smoke variant
  # with lr=1e-2, batch_size=64 would allow a margin: 0.05-0.19 over seeds 0-4.
  first, last = train_loss[10], train_loss[total]
  assert last < first - 0.03, f'train/loss did not decrease: {train_loss}'

  # TensorBoard event files hold the same scalars at the same steps.
  tags = _tensorboard_tags(workdir / 'tensorboard')
  assert sorted(tags['train/loss']) == sorted(train_loss)
  assert sorted(tags['eval/acc_tick_0']) == [30, 60]
  assert f'eval/acc_tick_{ticks - 1}' in tags

  # Per eval: the tick plot and the adaptive-compute table and plot (no attention gifs).
  plots = sorted(os.listdir(workdir / 'plots'))
  assert plots == [
      'adaptive_compute_0000030.json',
      'adaptive_compute_0000030.png',
      'adaptive_compute_0000060.json',
      'adaptive_compute_0000060.png',
      'eval_ticks_0000030.png',
      'eval_ticks_0000060.png',
  ]
  for name in plots:
    if name.endswith('.png'):
      assert (workdir / 'plots' / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# ---------------------------------------------------------------------------
# 2, 3. Exact resume after SIGKILL and SIGTERM, via the command line.

_RESUME_TOTAL = 120
_RESUME_FLAGS = (f'--config.training_iterations={_RESUME_TOTAL}', '--config.save_every=20')
# SIGKILL once this checkpoint is committed; SIGTERM once this step is logged
# (mid save interval and mid log window, so the stop usually lands off both
# grids). Either leaves the run >= 60 steps from its end.
_KILL_AFTER_CHECKPOINT = 40
_TERM_AFTER_LOG = 50


def _logged(workdir) -> list[dict]:
  """The complete records in metrics.jsonl so far (the run may be mid-write)."""
  try:
    text = pathlib.Path(workdir, 'metrics.jsonl').read_text()
  except FileNotFoundError:
    return []
  return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith('\n')]


def _wait_until(due, proc, log, what):
  """Polls `due()` while `proc` runs; fails if it exits first or takes too long."""
  deadline = time.monotonic() + _TIMEOUT
  while not due():
    if proc.poll() is not None:
      pytest.fail(f'exited ({proc.returncode}) before {what}:\n{_read(log)[-3000:]}')
    if time.monotonic() > deadline:
      pytest.fail(f'no {what} after {_TIMEOUT} s:\n{_read(log)[-3000:]}')
    time.sleep(0.02)


@pytest.fixture(scope='module')
def resume_runs(tmp_path_factory):
  """Runs of one config: uninterrupted, SIGKILLed, SIGTERMed; then the two
  interrupted ones rerun in their workdirs to completion.

  Compilation (~17 s a run) dominates on CPU, so the runs share a persistent
  compilation cache and the interrupted runs start once the uninterrupted one
  has compiled. A resumed run compiles its own executables (its restored
  arguments are committed to a device, the freshly initialised ones are not).
  """
  root = tmp_path_factory.mktemp('resume')
  dirs = {name: root / name for name in ('uninterrupted', 'sigkill', 'sigterm')}
  logs = {name: f'{d}.log' for name, d in dirs.items()}
  rerun_logs = {name: f'{dirs[name]}.rerun.log' for name in ('sigkill', 'sigterm')}
  info = {'dirs': dirs, 'logs': logs, 'rerun_logs': rerun_logs}
  launch = functools.partial(_launch, compilation_cache=root / 'compilation_cache')
  started = []
  try:
    reference = launch(dirs['uninterrupted'], *_RESUME_FLAGS)
    started.append(reference)
    _wait_until(
        lambda: any('eval/loss' in r for r in _logged(dirs['uninterrupted'])),
        reference,
        logs['uninterrupted'],
        'a first eval (init, train and eval steps compiled)',
    )
    procs = {name: launch(dirs[name], *_RESUME_FLAGS) for name in rerun_logs}
    started += procs.values()
    due = {
        'sigkill': lambda: _KILL_AFTER_CHECKPOINT in _committed_steps(dirs['sigkill']),
        'sigterm': lambda: _TERM_AFTER_LOG in [r['step'] for r in _logged(dirs['sigterm'])],
    }
    signals = {'sigkill': signal.SIGKILL, 'sigterm': signal.SIGTERM}
    deadline = time.monotonic() + _TIMEOUT
    while signals:  # both at once: either may be only a second from its end
      for name, sig in list(signals.items()):
        if procs[name].poll() is not None:
          pytest.fail(f'{name} run ended before {sig.name}:\n{_read(logs[name])[-3000:]}')
        if due[name]():
          info[f'{name}_steps_before'] = _committed_steps(dirs[name])
          procs[name].send_signal(sig)  # alive: poll() just returned None
          del signals[name]
      assert time.monotonic() < deadline, f'no point to interrupt after {_TIMEOUT} s'
      time.sleep(0.01)
    reruns = {}
    for name in procs:
      info[f'{name}_rc'] = _wait(procs[name], logs[name])
      info.setdefault('resume_step', {})[name] = max(_committed_steps(dirs[name]))
      reruns[name] = launch(dirs[name], *_RESUME_FLAGS, log=rerun_logs[name])
      started.append(reruns[name])
    info['uninterrupted_rc'] = _wait(reference, logs['uninterrupted'])
    for name, proc in reruns.items():
      info[f'{name}_rerun_rc'] = _wait(proc, rerun_logs[name])
  finally:
    for proc in started:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return info


def _assert_same_final_state(info, name):
  dirs = info['dirs']
  assert info[f'{name}_rerun_rc'] == 0, _read(info['rerun_logs'][name])[-3000:]
  assert info['uninterrupted_rc'] == 0, _read(info['logs']['uninterrupted'])[-3000:]
  for d in (dirs['uninterrupted'], dirs[name]):
    assert max(_committed_steps(d)) == _RESUME_TOTAL
  expected = _restore_raw(dirs['uninterrupted'], _RESUME_TOTAL)
  actual = _restore_raw(dirs[name], _RESUME_TOTAL)
  assert set(actual) >= {'params', 'opt_state', 'rng', 'step'}
  _assert_trees_equal(actual, expected, f'{name} rerun vs uninterrupted: state')


@pytest.mark.slow  # over 10 s: the slow tier (CI runs it after the default suite)
def test_resume_after_sigkill_is_exact(resume_runs):
  info = resume_runs
  assert info['sigkill_rc'] == -signal.SIGKILL, 'the run ended before SIGKILL reached it'
  assert _RESUME_TOTAL not in info['sigkill_steps_before']
  resume = info['resume_step']['sigkill']
  assert _KILL_AFTER_CHECKPOINT <= resume < _RESUME_TOTAL
  rerun_log = _read(info['rerun_logs']['sigkill'])
  assert f'resumed at step {resume}' in rerun_log, rerun_log[-3000:]
  _assert_same_final_state(info, 'sigkill')

  # Every record after the resume point matches (resume is on a log_every
  # boundary, so the windows line up); records before it were truncated and
  # rewritten only past `resume`, so the whole file matches too.
  expected = _scalars(info['dirs']['uninterrupted'], 'train/loss')
  actual = _scalars(info['dirs']['sigkill'], 'train/loss')
  assert sorted(actual) == sorted(expected) == list(range(10, _RESUME_TOTAL + 1, 10))
  after = [s for s in expected if s > resume]
  assert after and [actual[s] for s in after] == [expected[s] for s in after]
  assert actual == expected
  for key in ('eval/loss', 'eval/acc_tick_0', 'eval/certainty_last'):
    assert _scalars(info['dirs']['sigkill'], key) == _scalars(info['dirs']['uninterrupted'], key)


@pytest.mark.slow  # over 10 s: the slow tier (CI runs it after the default suite)
def test_resume_after_sigterm_is_exact(resume_runs):
  info = resume_runs
  log = _read(info['logs']['sigterm'])
  assert info['sigterm_rc'] == 0, log[-3000:]
  match = re.search(r'SIGTERM: checkpointed step (\d+), exiting', log)
  assert match, log[-3000:]
  stopped = int(match.group(1))
  assert _TERM_AFTER_LOG <= stopped < _RESUME_TOTAL
  assert info['resume_step']['sigterm'] == stopped  # its checkpoint is the latest
  rerun_log = _read(info['rerun_logs']['sigterm'])
  assert f'resumed at step {stopped}' in rerun_log, rerun_log[-3000:]
  _assert_same_final_state(info, 'sigterm')

  # The stop logs its partial window at the stopped step; the first window after
  # the stop covers only the steps after it; later windows match exactly.
  expected = _scalars(info['dirs']['uninterrupted'], 'train/loss')
  actual = _scalars(info['dirs']['sigterm'], 'train/loss')
  assert sorted(actual) == sorted(set(expected) | {stopped})
  first_full = (stopped // 10 + 1) * 10 + 10
  after = [s for s in expected if s >= first_full]
  assert after and [actual[s] for s in after] == [expected[s] for s in after]
  assert [actual[s] for s in expected if s <= stopped] == [
      expected[s] for s in expected if s <= stopped
  ]
  for key in ('eval/loss', 'eval/acc_tick_0', 'eval/certainty_last'):
    assert _scalars(info['dirs']['sigterm'], key) == _scalars(info['dirs']['uninterrupted'], key)


def test_sigterm_during_eval_checkpoints_that_step(tmp_path, monkeypatch):
  plot_ticks = plots.plot_ticks

  def plot_and_terminate(*args, **kwargs):
    if 'step 12' in kwargs.get('title', ''):  # track_every=12, save_every=8
      os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer's StopRequest
    return plot_ticks(*args, **kwargs)

  monkeypatch.setattr(plots, 'plot_ticks', plot_and_terminate)
  config = _smoke(track_every=12, save_every=8, training_iterations=20)
  state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  stopped = int(state.step)
  assert stopped in (12, 13)  # this step, or the next one if the signal is seen late
  assert _committed_steps(tmp_path / 'run') == [8, stopped]


# ---------------------------------------------------------------------------
# 4. A save killed half way leaves the previous checkpoint restorable.

_SAVE_THEN_HANG = '''
"""Commits a small step 1, then starts a large step 2, prints SAVING and hangs."""
import os
import sys
import time

from absl import flags
import numpy as np

from ctm_jax import checkpoint
from ctm_jax.data import parity
from ctm_jax.data import pipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from small_state import small_state

flags.FLAGS.mark_as_parsed()
workdir, big_mib = sys.argv[1], int(sys.argv[2])
ckpt = checkpoint.Checkpointer(workdir, keep=3)
iterator = iter(pipeline.make_train_loader(parity.train_source(8, 0), batch_size=4, seed=0))
for _ in range(3):
  next(iterator)
ckpt.save(1, small_state(), iterator)
ckpt.wait()
# What a run resumed from step 1 must read next.
np.savez(os.path.join(workdir, 'next_batch.npz'), **next(iterator))
n = big_mib * 2**20 // 4 // 8
big = {f'w{i}': np.random.default_rng(i).standard_normal(n, np.float32) for i in range(8)}
ckpt.save(2, {'params': big, 'step': np.int32(2)}, iterator)  # returns once the write is under way
print('SAVING', flush=True)
ckpt.wait()
print('SAVED', flush=True)
time.sleep(600)
'''

_SMALL_STATE = """
import jax.numpy as jnp


def small_state():
  return {
      'params': {'w': jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4) / 7},
      'rng': jnp.asarray([1, 2], jnp.uint32),
      'step': jnp.asarray(1, jnp.int32),
  }
"""


def _kill_during_save(script, workdir, big_mib):
  """Runs `script` until step 2's save is under way, SIGKILLs it; True if killed mid-save."""
  log = f'{workdir}.log'
  with open(log, 'w') as f:
    proc = subprocess.Popen(
        [sys.executable, '-u', str(script), str(workdir), str(big_mib)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=f,
        text=True,
    )
  try:
    for line in proc.stdout:  # blocks until the marker (or EOF if the script died)
      if line.startswith('SAVING'):
        break
    else:
      pytest.fail(f'the save script exited ({proc.wait()}) without saving:\n{_read(log)[-3000:]}')
    tmp = os.path.join(workdir, 'checkpoints', '2.orbax-checkpoint-tmp*')
    deadline = time.monotonic() + 10
    while not glob.glob(tmp) and 2 not in _committed_steps(workdir):
      assert time.monotonic() < deadline, 'no step-2 tmp directory appeared'
      time.sleep(0.005)
    mid_save = proc.poll() is None and bool(glob.glob(tmp))
    proc.kill()
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  return mid_save and 2 not in _committed_steps(workdir)


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
  script = tmp_path / 'save_then_hang.py'
  script.write_text(_SAVE_THEN_HANG)
  (tmp_path / 'small_state.py').write_text(_SMALL_STATE)
  namespace = {}
  exec(_SMALL_STATE, namespace)  # pylint: disable=exec-used
  small_state = namespace['small_state']

  # ~0.3 s to start writing 256 MiB, ~2 s to finish here; retry larger if it won.
  for attempt, big_mib in enumerate((256, 512, 1024)):
    workdir = tmp_path / f'attempt{attempt}'
    if _kill_during_save(script, workdir, big_mib):
      break
  else:
    pytest.fail('every step-2 save finished before SIGKILL (disk faster than expected)')
  assert glob.glob(os.path.join(workdir, 'checkpoints', '2.orbax-checkpoint-tmp*'))

  ckpt = checkpoint.Checkpointer(workdir, keep=3)
  try:
    assert ckpt.latest_step() == 1  # what train_and_evaluate resumes from
    assert ckpt.manager.all_steps() == [1]
    iterator = iter(
        pipeline.make_train_loader(parity_data.train_source(8, 0), batch_size=4, seed=0)
    )
    expected = small_state()
    restored = ckpt.restore(1, jax.eval_shape(small_state), iterator)
    _assert_trees_equal(restored, expected, 'step 1')
    next_batch = np.load(os.path.join(workdir, 'next_batch.npz'))
    _assert_trees_equal(next(iterator), dict(next_batch), 'batch after step 1')

    # The leftover tmp directory does not stop the resumed run from saving step 2.
    ckpt.save(2, expected, iterator)
    ckpt.wait()
    assert ckpt.manager.all_steps() == [1, 2]
  finally:
    ckpt.close()


# ---------------------------------------------------------------------------
# 5. Bad configs fail before anything is written; a changed model is refused.


@pytest.mark.parametrize(
    'field, value',
    [
        ('batch_size', 0),
        ('model.d_input', 7),  # not divisible by heads=2
        ('model.backbone_type', 'resnet99-1'),
        ('gradient_clipping', 2.0),  # a quantile must be in (0, 1]
        ('warmup_steps', 60),  # not below training_iterations
    ],
)
def test_bad_config_is_rejected_before_writing(tmp_path, field, value):
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=re.escape(f'config.{field}={value!r}')):
    train.train_and_evaluate(_smoke(**{field: value}), str(workdir))
  assert not workdir.exists()


def _only_error_line(log_path) -> str:
  """The one `ctm_jax.main:` line of a refused run (and no traceback)."""
  return one_error_line(_read(log_path))


def test_cli_mistakes_are_one_line_exit_2_and_write_nothing(tmp_path):
  (tmp_path / 'a_file').write_text('not a directory')
  cases = {
      'lrr': ('--config.lrr=1', '--config.lrr: ', 'did you mean config.lr'),
      'nested': ('--config.model.d_modle=3', '--config.model.d_modle: ', 'config.model.d_model'),
      'batch_size': ('--config.batch_size=0', 'config.batch_size=0: must be a positive integer', ''),
      'mesh': (
          '--config.mesh.data=3',
          'config.mesh (data=3, fsdp=1, neuron=1) needs 3 devices; the run has 2',
          '',
      ),
      'no_file': ('--config=configs/nope.py', '--config=configs/nope.py: no such config file', 'parity.py'),
      'variant': ('--config=configs/parity.py:huge', "variant 'huge' is unknown", "'small'"),
      'not_a_float': ('--config.lr=abc', '--config.lr=abc', 'float'),
  }
  procs = {name: _launch(tmp_path / name, flag) for name, (flag, _, _) in cases.items()}
  # A workdir that cannot be created: a path under a file.
  procs['workdir'] = _launch(tmp_path / 'a_file' / 'run', log=f'{tmp_path / "workdir"}.log')
  for name, proc in procs.items():
    log = f'{tmp_path / name}.log'
    returncode = _wait(proc, log)
    line = _only_error_line(log)
    assert returncode == 2, _read(log)[-3000:]
    if name in cases:
      _, first, second = cases[name]
      assert first in line and second in line, line
      assert not (tmp_path / name).exists()
  line = _only_error_line(f'{tmp_path / "workdir"}.log')
  assert f'--workdir={tmp_path / "a_file" / "run"}: cannot create it' in line, line


def test_workdir_of_another_model_is_refused(smoke_run):
  _, workdir, _ = smoke_run
  before = _tree_snapshot(workdir)
  with pytest.raises(checkpoint.IncompatibleWorkdir, match=r'changed: model\.d_model\b'):
    train.train_and_evaluate(_smoke(**{'model.d_model': 64}), str(workdir))
  assert _tree_snapshot(workdir) == before
  assert _committed_steps(workdir) == [20, 40, 60]


def test_cli_refuses_another_model_in_one_line(smoke_run, tmp_path):
  _, source, _ = smoke_run
  workdir = tmp_path / 'run'
  shutil.copytree(source, workdir)
  before = _tree_snapshot(workdir)
  log = f'{tmp_path / "refused"}.log'
  returncode = _wait(_launch(workdir, '--config.model.d_model=64', log=log), log)
  assert returncode == 2, _read(log)[-3000:]
  line = _only_error_line(log)
  assert f'workdir {workdir} holds checkpoints of a different model (changed: model.d_model)' in line
  assert _tree_snapshot(workdir) == before


def test_workdir_without_config_json_is_not_rewritten_by_another_model(smoke_run, tmp_path):
  """config.json lost: another model is refused without writing one, and the
  original command still resumes."""
  config, source, _ = smoke_run
  workdir = tmp_path / 'run'
  shutil.copytree(source, workdir)
  (workdir / 'config.json').unlink()
  before = _tree_snapshot(workdir)
  with pytest.raises(checkpoint.IncompatibleWorkdir, match='no config.json saying which'):
    train.train_and_evaluate(_smoke(**{'model.d_model': 64}), str(workdir))
  assert _tree_snapshot(workdir) == before
  longer = _smoke(training_iterations=config.training_iterations + 1)
  state = train.train_and_evaluate(longer, str(workdir))
  assert int(state.step) == config.training_iterations + 1
  assert (workdir / 'config.json').exists()


def _largest_file(directory):
  files = [p for p in pathlib.Path(directory).rglob('*') if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _damage(step_dir, kind):
  """Damages one checkpoint step the ways disks, copies and crashes do."""
  if kind == 'truncated':
    target = _largest_file(step_dir / 'state')
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
  elif kind == 'bit_flips':
    target = _largest_file(step_dir / 'state')
    data = bytearray(target.read_bytes())
    for i, bit in ((len(data) // 3, 1), (len(data) // 2, 4), (2 * len(data) // 3, 7)):
      data[i] ^= 1 << bit
    target.write_bytes(bytes(data))
  elif kind == 'empty_dir':
    shutil.rmtree(step_dir)
    step_dir.mkdir()
  elif kind == 'no_metadata':
    (step_dir / '_CHECKPOINT_METADATA').unlink()
    (step_dir / 'state' / '_METADATA').unlink()
  elif kind == 'iterator_json':
    (step_dir / 'data' / 'process_0-of-1.json').write_text('{"next_index": 1')


@pytest.mark.parametrize(
    'kind',
    [
        'truncated',
        'bit_flips',
        pytest.param('empty_dir', marks=pytest.mark.slow),
        pytest.param('no_metadata', marks=pytest.mark.slow),
        pytest.param('iterator_json', marks=pytest.mark.slow),
    ],
)
def test_damaged_latest_checkpoint_falls_back_and_is_kept_aside(smoke_run, tmp_path, kind, caplog):
  config, source, expected = smoke_run
  workdir = tmp_path / 'run'
  shutil.copytree(source, workdir)
  _damage(workdir / 'checkpoints' / '60', kind)
  with caplog.at_level('WARNING'):
    state = train.train_and_evaluate(config, str(workdir))
  # Resumed from 40 and retrained 41-60: the same state as the undamaged run.
  _assert_trees_equal(state, expected, f'resumed past a damaged step ({kind})')
  warnings = [r.getMessage() for r in caplog.records if 'is damaged' in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].startswith('Checkpoint step 60 is damaged'), warnings
  assert str(workdir / 'damaged_checkpoints' / '60') in warnings[0]
  assert (workdir / 'damaged_checkpoints' / '60').is_dir()  # kept, not deleted
  assert _committed_steps(workdir) == [20, 40, 60]


def test_every_checkpoint_damaged_is_one_error_and_nothing_deleted(smoke_run, tmp_path):
  config, source, _ = smoke_run
  workdir = tmp_path / 'run'
  shutil.copytree(source, workdir)
  for step in (20, 40, 60):
    _damage(workdir / 'checkpoints' / str(step), 'bit_flips')
  with pytest.raises(checkpoint.NoIntactCheckpoint, match='no intact checkpoint in .*step'):
    train.train_and_evaluate(config, str(workdir))
  assert sorted(os.listdir(workdir / 'damaged_checkpoints')) == [
      '20', '20.checksums.json', '40', '40.checksums.json', '60', '60.checksums.json'
  ]


@pytest.mark.parametrize(
    'overrides, message',
    [
        ({'batch_size': 4096}, r'config\.batch_size=4096: the train set has 1000 records'),
        ({'n_test_batches': 10_000}, r'config\.n_test_batches=10000: the held-out set has'),
        ({'seed': 2**32}, r'config\.seed=4294967296: must be below 2\*\*32'),
    ],
)
def test_data_the_run_cannot_fill_is_refused_before_the_workdir(
    tmp_path, monkeypatch, overrides, message
):
  small = lambda self, config: parity_data.train_source(
      config.parity_sequence_length, config.seed, num_records=1000
  )
  monkeypatch.setattr(type(tasks.get('parity')), 'train_source', small)
  config = _smoke(**overrides)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_fewer_iterations_than_the_checkpoint_is_refused(smoke_run):
  config, workdir, _ = smoke_run
  before = _tree_snapshot(workdir)
  with pytest.raises(
      validation.UsageError,
      match=r'config\.training_iterations=40: .* checkpoint at step 60; pass '
      r'--config\.training_iterations=60 or more',
  ):
    train.train_and_evaluate(_smoke(training_iterations=40, warmup_steps=5), str(workdir))
  assert _tree_snapshot(workdir) == before


def test_compute_options_may_change_on_resume(tmp_path):
  config = _smoke()
  keys = tasks.get(config.task).identity_keys
  checkpoint.write_config(str(tmp_path), config)
  config.model.update(
      dtype='bfloat16', remat='full', backbone_remat='block', unroll=2, deferred_grads=True
  )
  config.mesh.update(data=2, fsdp=4)
  checkpoint.check_config(str(tmp_path), config, True, keys)
  config.parity_sequence_length *= 2
  with pytest.raises(checkpoint.IncompatibleWorkdir, match=r'changed: parity_sequence_length\)'):
    checkpoint.check_config(str(tmp_path), config, True, keys)


def test_workdir_from_before_a_compute_option_resumes(tmp_path):
  """A config.json written before backbone_remat / deferred_grads existed."""
  config = _smoke()
  keys = tasks.get(config.task).identity_keys
  checkpoint.write_config(str(tmp_path), config)
  path = tmp_path / checkpoint.CONFIG_FILE
  written = json.loads(path.read_text())
  for key in ('backbone_remat', 'deferred_grads'):
    del written['model'][key]
  path.write_text(json.dumps(written))
  checkpoint.check_config(str(tmp_path), config, True, keys)


# ---------------------------------------------------------------------------
# 6. A non-finite step raises, naming the step, and never reaches a checkpoint.


def _poison(monkeypatch, poisoned_step):
  """Makes the train step that ends at `poisoned_step` non-finite. Returns the
  list of (step, whether the step left the whole state as it was) it fills."""
  make_train_step = steps.make_train_step
  unchanged = []  # (step, whether the step left the whole state as it was)

  def make_poisoned_train_step(config, model, task, *args, **kwargs):
    # NaN inputs would not do: the parity backbone reads tokens (x == 1), so
    # the loss is scaled by NaN instead, inside the real (jitted) train step.
    class Poisoned(type(task)):
      def loss(self, config, output, batch):
        value, aux = super().loss(config, output, batch)
        return value * batch['loss_scale'], aux

    train_step = make_train_step(config, model, Poisoned(), *args, **kwargs)

    def poisoned(state, batch):
      # state.step counts the steps done: poison the one that ends at `poisoned_step`.
      scale = jnp.where(state.step == poisoned_step - 1, jnp.nan, 1.0)
      new_state, metrics = train_step(state, {**batch, 'loss_scale': scale})
      same = jax.tree.map(jnp.array_equal, new_state, state)
      jax.debug.callback(
          lambda step, same: unchanged.append((int(step) + 1, bool(same))),
          state.step,
          jnp.all(jnp.stack(jax.tree.leaves(same))),
      )
      return new_state, metrics

    return poisoned

  monkeypatch.setattr(steps, 'make_train_step', make_poisoned_train_step)
  return unchanged


def test_non_finite_loss_raises_and_keeps_last_checkpoint(tmp_path, monkeypatch):
  poisoned_step = 12  # a save step: its (unchanged) state must not be saved either
  unchanged = _poison(monkeypatch, poisoned_step)
  config, workdir = _smoke(save_every=6, training_iterations=20, log_every=5), tmp_path / 'run'
  with pytest.raises(train.NonFiniteError, match=rf'at step {poisoned_step}\b') as error:
    train.train_and_evaluate(config, str(workdir))
  message = str(error.value)
  assert "'loss': nan" in message and "'grad_norm': nan" in message, message
  # What is kept, with the loss logged at or before it.
  loss_5 = next(r['train/loss'] for r in _records(workdir) if r['step'] == 5)
  kept = f'the newest checkpoint is step 6 in {workdir}/checkpoints; train loss logged at step 5: '
  assert f'{kept}{loss_5:.4g}' in message, message
  jax.effects_barrier()
  assert [step for step, same in unchanged if same] == [poisoned_step]
  assert sorted(step for step, _ in unchanged) == list(range(1, poisoned_step + 1))

  assert _committed_steps(workdir) == [6]
  assert not glob.glob(os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*'))
  state, _ = _restore_like_trainer(config, workdir, 6)
  assert int(state.step) == 6
  for path, leaf in jax.tree.flatten_with_path((state.params, state.opt_state))[0]:
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.inexact):
      assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)
  # Nothing was logged past the last good step.
  assert max(r['step'] for r in _records(workdir)) < poisoned_step


def test_non_finite_before_any_checkpoint_says_there_is_none(tmp_path, monkeypatch):
  _poison(monkeypatch, 3)
  workdir = tmp_path / 'run'
  with pytest.raises(train.NonFiniteError, match='at step 3: .*no checkpoint has been saved'):
    train.train_and_evaluate(_smoke(save_every=6, training_iterations=20), str(workdir))
  assert _committed_steps(workdir) == []


def test_a_url_other_than_a_bucket_is_refused_before_anything_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r'--workdir=s3://bucket/run: only local paths and gs://BUCKET/PATH'):
    train.train_and_evaluate(_smoke(), 's3://bucket/run')
  assert not os.listdir(tmp_path)
