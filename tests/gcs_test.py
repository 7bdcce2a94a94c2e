"""gs:// workdirs against a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py):
no credentials, no network. Training writes checkpoints (TensorStore), the
config, metrics.jsonl, TensorBoard and plots into the bucket, resumes there
after SIGKILL to the state an uninterrupted local run ends with, and falls
back past a damaged step; the workdir lock is an object that refuses a
second run and is taken over once stale; a missing bucket is one line."""

import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from conftest import one_error_line

# Found, not imported: gcsfs reads its settings when imported, after the emulator is named.
if not importlib.util.find_spec('gcsfs'):
  pytest.skip('the gcs extra (pip install -e ".[gcs]")', allow_module_level=True)
if not importlib.util.find_spec('gcp_storage_emulator'):
  pytest.skip('the GCS emulator (the test extra)', allow_module_level=True)

REPO = pathlib.Path(__file__).resolve().parents[1]
_TIMEOUT = 300
_TOTAL, _SAVE_EVERY, _KILL_AFTER = 60, 20, 20
_FLAGS = (f'--config.training_iterations={_TOTAL}', f'--config.save_every={_SAVE_EVERY}',
          '--config.keep_checkpoints=5')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _emulator_env(url) -> dict[str, str]:
  return dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, CLOUD_STORAGE_EMULATOR_ENDPOINT=url,
              GOOGLE_AUTH_TOKEN_FOR_TESTING='emulator', GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false')


@pytest.fixture(scope='module')
def emulator():
  """The emulator's URL, and the environment Google's libraries read it from."""
  port = _free_port()
  proc = _start_emulator(port)
  url = f'http://127.0.0.1:{port}'
  saved = {k: os.environ.get(k) for k in _emulator_env(url)}
  # What ctm_jax.storage sets from STORAGE_EMULATOR_HOST, set here for this emulator.
  os.environ.update(_emulator_env(url))
  yield url
  proc.terminate()
  proc.wait()
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


@pytest.fixture
def bucket_dir(emulator):
  """A fresh folder in the emulator's bucket."""
  del emulator
  return f'gs://test-bucket/{uuid.uuid4().hex[:12]}'


def _launch(workdir, *overrides, log, cache):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_COMPILATION_CACHE_DIR=str(cache))
  command = [sys.executable, '-m', 'ctm_jax.main', '--config=configs/parity.py:smoke',
             f'--workdir={workdir}', *_FLAGS, *overrides]
  with open(log, 'a') as f:
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait(proc, log) -> int:
  try:
    return proc.wait(_TIMEOUT)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    pytest.fail(f'{proc.args} ran past {_TIMEOUT} s:\n{pathlib.Path(log).read_text()[-3000:]}')


def _restore(workdir, step):
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from ctm_jax import checkpoint  # pylint: disable=g-import-not-at-top

  ckpt = checkpoint.Checkpointer(workdir, keep=100)
  try:
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    ckpt.close()
  return jax.tree.map(np.asarray, restored['state'])


@pytest.mark.slow  # five training runs (~2.5 min on 2 cores)
def test_a_bucket_run_killed_preempted_and_resumed_equals_an_uninterrupted_local_run(bucket_dir, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from ctm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from ctm_jax import storage  # pylint: disable=g-import-not-at-top

  cache = tmp_path / 'compilation_cache'
  local = tmp_path / 'local'
  reference = _launch(local, log=tmp_path / 'local.log', cache=cache)
  run = _launch(bucket_dir, log=tmp_path / 'bucket.log', cache=cache)
  checkpoints = storage.join(bucket_dir, 'checkpoints')
  deadline = time.monotonic() + _TIMEOUT
  while _KILL_AFTER not in checkpoint.committed_steps(checkpoints):
    assert run.poll() is None, (tmp_path / 'bucket.log').read_text()[-3000:]
    assert time.monotonic() < deadline, 'no checkpoint to kill after'
    time.sleep(0.05)
  run.send_signal(signal.SIGKILL)
  run.wait()
  assert max(checkpoint.committed_steps(checkpoints)) < _TOTAL
  # Resumed, then preempted (SIGTERM): it checkpoints into the bucket and exits.
  preempted = _launch(bucket_dir, log=tmp_path / 'preempted.log', cache=cache)
  while 'Run parity (resumed' not in (tmp_path / 'preempted.log').read_text():
    assert preempted.poll() is None, (tmp_path / 'preempted.log').read_text()[-3000:]
    assert time.monotonic() < deadline + _TIMEOUT, 'the resumed run did not start'
    time.sleep(0.05)
  time.sleep(1)  # into the loop, whose handler turns SIGTERM into a checkpoint
  preempted.send_signal(signal.SIGTERM)
  assert _wait(preempted, tmp_path / 'preempted.log') == 0, (tmp_path / 'preempted.log').read_text()[-3000:]
  assert 'SIGTERM: checkpointed step' in (tmp_path / 'preempted.log').read_text()
  assert max(checkpoint.committed_steps(checkpoints)) < _TOTAL
  rerun = _launch(bucket_dir, log=tmp_path / 'rerun.log', cache=cache)
  assert _wait(rerun, tmp_path / 'rerun.log') == 0, (tmp_path / 'rerun.log').read_text()[-3000:]
  assert _wait(reference, tmp_path / 'local.log') == 0, (tmp_path / 'local.log').read_text()[-3000:]
  assert 'Resumed from gs://' in (tmp_path / 'rerun.log').read_text()
  expected, actual = _restore(str(local), _TOTAL), _restore(bucket_dir, _TOTAL)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(actual)):
    np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
  # The run's records live in the bucket: one metrics.jsonl, read as one file.
  records = [json.loads(line) for line in storage.path(storage.join(bucket_dir, 'metrics.jsonl')).read_text().splitlines()]
  steps = [r['step'] for r in records if 'train/loss' in r]
  assert steps == sorted(set(steps)) and steps[-1] == _TOTAL
  assert json.loads(storage.path(storage.join(bucket_dir, 'config.json')).read_text())['training_iterations'] == _TOTAL
  assert any(name.startswith('events') for name in storage.names(storage.join(bucket_dir, 'tensorboard')))
  assert any(name.endswith('.png') for name in storage.names(storage.join(bucket_dir, 'plots')))
  assert storage.names(storage.join(bucket_dir, 'checksums'))

  # A damaged newest step is set aside in the bucket and the run goes on from the one before.
  damaged = storage.join(checkpoints, str(_TOTAL), 'state', 'manifest.ocdbt')
  storage.write_bytes(damaged, b'flipped' + storage.path(damaged).read_bytes()[7:])
  again = _launch(bucket_dir, f'--config.training_iterations={_TOTAL + _SAVE_EVERY}',
                  log=tmp_path / 'again.log', cache=cache)
  assert _wait(again, tmp_path / 'again.log') == 0, (tmp_path / 'again.log').read_text()[-3000:]
  log = (tmp_path / 'again.log').read_text()
  assert f'Checkpoint step {_TOTAL} is damaged' in log and 'Resumed from' in log
  assert str(_TOTAL) in storage.names(storage.join(bucket_dir, 'damaged_checkpoints'))
  assert max(checkpoint.committed_steps(checkpoints)) == _TOTAL + _SAVE_EVERY


def test_a_second_run_on_a_bucket_workdir_is_refused_and_a_stale_lock_taken_over(bucket_dir, tmp_path, monkeypatch):
  from ctm_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  with workdir_lib.Lock(bucket_dir):
    with pytest.raises(workdir_lib.WorkdirInUse, match=r'is in use by another run \(pid \d+ on '):
      with workdir_lib.Lock(bucket_dir):
        pass
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    done = subprocess.run(
        [sys.executable, '-m', 'ctm_jax.main', '--config=configs/parity.py:smoke', f'--workdir={bucket_dir}'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=_TIMEOUT,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert f'--workdir={bucket_dir} is in use by another run' in one_error_line(done.stderr)
  with workdir_lib.Lock(bucket_dir):  # released on exit
    pass
  # A holder killed without releasing: its lock stops being refreshed and expires.
  abandoned = workdir_lib.BucketLock(bucket_dir, expiry_s=1.0).__enter__()
  abandoned._stop.set()  # pylint: disable=protected-access  # as a SIGKILL stops the refresh
  with pytest.raises(workdir_lib.WorkdirInUse, match='a lock not refreshed for 1 s is taken over'):
    with workdir_lib.BucketLock(bucket_dir, expiry_s=1.0):
      pass
  time.sleep(2.5)
  with workdir_lib.BucketLock(bucket_dir, expiry_s=1.0):
    pass
  # A live holder keeps its lock past the expiry by refreshing it.
  with workdir_lib.BucketLock(bucket_dir, expiry_s=1.0):
    time.sleep(2.5)
    with pytest.raises(workdir_lib.WorkdirInUse):
      with workdir_lib.BucketLock(bucket_dir, expiry_s=1.0):
        pass


def test_a_missing_bucket_or_another_scheme_is_one_line_before_anything_runs(emulator):
  del emulator
  from ctm_jax import train  # pylint: disable=g-import-not-at-top
  from ctm_jax import validation  # pylint: disable=g-import-not-at-top
  from ctm_jax.configs import parity  # pylint: disable=g-import-not-at-top

  with pytest.raises(validation.UsageError, match=r'--workdir=gs://no-such-bucket/run: no bucket gs://no-such-bucket; create it'):
    train.train_and_evaluate(parity.get_config('smoke'), 'gs://no-such-bucket/run')


@pytest.fixture(scope='module')
def bucket_run(emulator):
  """(config, gs:// workdir) of one short parity run trained into the bucket, in-process."""
  del emulator
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ctm_jax import train  # pylint: disable=g-import-not-at-top
  from ctm_jax.configs import parity  # pylint: disable=g-import-not-at-top

  flags.FLAGS.mark_as_parsed()
  config = parity.get_config('smoke')
  config.training_iterations = 20
  config.profile_steps = '3,3'
  workdir = f'gs://test-bucket/{uuid.uuid4().hex[:12]}'
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_a_profile_of_the_steps_asked_for_lands_in_the_bucket(bucket_run):
  from ctm_jax import storage  # pylint: disable=g-import-not-at-top
  from ctm_jax import validation  # pylint: disable=g-import-not-at-top

  _, workdir = bucket_run
  fs = storage.filesystem(workdir)
  traces = [p for p in fs.find(storage.join(workdir, 'profile')) if p.endswith('.xplane.pb')]
  assert traces and all(fs.size(p) > 0 for p in traces)
  config = bucket_run[0].copy_and_resolve_references()
  for bad in ('4,3', '0,2', '3', 'a,b', '1,2,3'):
    config.profile_steps = bad
    with pytest.raises(ValueError, match=r"config\.profile_steps=.*expected 'A,B'"):
      validation.validate(config)


def test_evaluate_export_and_predict_read_and_write_a_bucket_run(bucket_run):
  import jax  # pylint: disable=g-import-not-at-top
  from ctm_jax import artefact  # pylint: disable=g-import-not-at-top
  from ctm_jax import evaluate  # pylint: disable=g-import-not-at-top
  from ctm_jax import export  # pylint: disable=g-import-not-at-top
  from ctm_jax import inference  # pylint: disable=g-import-not-at-top
  from ctm_jax import predict  # pylint: disable=g-import-not-at-top
  from ctm_jax import storage  # pylint: disable=g-import-not-at-top
  from ctm_jax import validation  # pylint: disable=g-import-not-at-top

  config, workdir = bucket_run
  scalars = evaluate.evaluate(workdir, n_test_batches=1)
  assert scalars['step'] == config.training_iterations
  written = json.loads(storage.path(storage.join(workdir, f'eval_{config.training_iterations}', 'metrics.json')).read_text())
  assert written['eval/acc_most_certain'] == scalars['eval/acc_most_certain']
  model, variables, _ = inference.load(workdir)
  out = storage.join(workdir, 'artefact')
  spec = export.export(workdir, out)
  assert spec['source'] == {'workdir': workdir, 'step': config.training_iterations} and spec['bytes'] > 0
  with pytest.raises(validation.UsageError, match='already holds an exported artefact; pass --overwrite'):
    export.export(workdir, out)
  bits = np.sign(np.random.default_rng(0).standard_normal((2, config.parity_sequence_length))).astype(np.float32)
  program = artefact.load_program(out)
  want = jax.jit(model.apply)(variables, bits).predictions
  np.testing.assert_allclose(program(bits)['predictions'], want, atol=1e-5)
  _, again, _ = inference.load(out)
  jax.tree.map(np.testing.assert_array_equal, again, variables)
  rows, summary = predict.predict(workdir, ''.join('1' if b > 0 else '0' for b in bits[0]))
  assert summary['task'] == 'parity' and len(rows) == config.model.iterations


def _start_emulator(port, data_dir=None):
  """The emulator on 127.0.0.1:`port` (its objects on disk in `data_dir`, else in memory), once it answers."""
  args = [sys.executable, str(REPO / 'tests' / 'gcs_emulator.py'), str(port), *([str(data_dir)] if data_dir else [])]
  proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 30
  while True:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      return proc
    except OSError:
      assert proc.poll() is None and time.monotonic() < deadline, 'the GCS emulator did not start'
      time.sleep(0.1)


@pytest.mark.slow  # storage lost mid-run: the run gives up within its retry bounds (~1.5 min)
def test_storage_that_goes_away_ends_the_run_in_one_line_and_it_resumes_once_back(tmp_path):
  port, data = _free_port(), tmp_path / 'gcs'
  url = f'http://127.0.0.1:{port}'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', **_emulator_env(url))
  command = [sys.executable, '-m', 'ctm_jax.main', '--config=configs/parity.py:smoke',
             '--workdir=gs://test-bucket/away', '--config.save_every=50']
  emulator = _start_emulator(port, data)
  log = tmp_path / 'run.log'
  try:
    with open(log, 'w') as f:
      run = subprocess.Popen(command + ['--config.training_iterations=100000'], cwd=REPO, env=env,
                             stdout=f, stderr=subprocess.STDOUT)
    committed = data / '.cloudstorage' / 'test-bucket' / 'away' / 'checkpoints' / '50' / 'commit_success.txt'
    deadline = time.monotonic() + _TIMEOUT
    while not committed.exists():
      assert run.poll() is None, log.read_text()[-3000:]
      assert time.monotonic() < deadline, 'no checkpoint before storage goes away'
      time.sleep(0.1)
    emulator.terminate()
    emulator.wait()
    assert _wait(run, log) == 1, log.read_text()[-3000:]
    error = one_error_line(log.read_text())
    assert 'saving checkpoint step' in error and 'rerun the same command' in error, error
    # Storage back: the same command resumes from the last committed step.
    emulator = _start_emulator(port, data)
    newest = max(int(p.name) for p in committed.parents[1].iterdir() if p.name.isdigit())
    done = subprocess.run(command + [f'--config.training_iterations={newest + 20}'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'Resumed from gs://test-bucket/away/checkpoints/' in done.stderr
  finally:
    if run.poll() is None:
      run.kill()
    emulator.terminate()
    emulator.wait()


# ---------------------------------------------------------------------------
# Data in the bucket: tfds array_record splits and maze folders.


def _prepare_cifar10(data_dir, train=12, test=6):
  """A cifar10 prepared as `tfds build cifar10 --file_format=array_record`
  writes it (tfds's own builder, its features and version), from random
  pictures: PNGs encoded here, so preparing needs no TensorFlow."""
  import io  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  class RandomCifar10(tfds.builder_cls('cifar10'), skip_registration=True):
    name = 'cifar10'

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(train, 0), 'test': self._generate_examples(test, 1)}

    def _generate_examples(self, n, seed):  # pylint: disable=arguments-differ
      rng = np.random.default_rng(seed)
      for i in range(n):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(png, format='PNG')
        png.seek(0)
        yield f'{seed}_{i}', {'id': f'{seed}_{i}', 'image': png, 'label': i % 10}

  RandomCifar10(data_dir=str(data_dir), file_format='array_record').download_and_prepare()


@pytest.fixture(scope='module')
def bucket_cifar10(emulator, tmp_path_factory):
  """(local data_dir, gs:// data_dir) holding the same prepared cifar10."""
  del emulator
  from ctm_jax import storage  # pylint: disable=g-import-not-at-top

  local = tmp_path_factory.mktemp('tfds')
  _prepare_cifar10(local)
  bucket = f'gs://test-bucket/{uuid.uuid4().hex[:12]}/tfds'
  storage.copy_up(str(local / 'cifar10'), storage.join(bucket, 'cifar10'))
  return str(local), bucket


def test_tfds_splits_in_the_bucket_read_as_from_disk_by_the_image_pipeline(bucket_cifar10):
  from ctm_jax import storage  # pylint: disable=g-import-not-at-top
  from ctm_jax.configs import cifar10  # pylint: disable=g-import-not-at-top
  from ctm_jax.data import images  # pylint: disable=g-import-not-at-top

  local, bucket = bucket_cifar10
  configs = []
  for data_dir in (local, bucket):
    config = cifar10.get_config('smoke')
    config.data_dir = data_dir
    images.check_data(config)
    configs.append(config)
  sources = [(images.train_source(c), images.eval_source(c)) for c in configs]
  (train_local, eval_local), (train_bucket, eval_bucket) = sources
  assert len(train_bucket) == 12 and len(eval_bucket) == 6
  for i in range(12):
    np.testing.assert_array_equal(train_bucket[i]['image'], train_local[i]['image'])
    assert int(train_bucket[i]['label']) == int(train_local[i]['label'])
  for i in range(6):
    np.testing.assert_array_equal(eval_bucket[i]['inputs'], eval_local[i]['inputs'])
    np.testing.assert_array_equal(eval_bucket[i]['targets'], eval_local[i]['targets'])
  config = configs[1]
  config.data_dir = storage.join(bucket, 'missing')
  with pytest.raises(ValueError, match=r"split 'train' is not prepared as array_record in config\.data_dir='gs://"):
    images.check_data(config)
  config.data_dir = 's3://bucket/tfds'
  with pytest.raises(ValueError, match=r'config\.data_dir=s3://bucket/tfds: only local paths and gs://'):
    images.check_data(config)


@pytest.mark.slow  # two short image runs on 8 devices (~1.5 min on 2 cores)
def test_an_image_run_on_bucket_data_resumes_from_the_bucket_onto_another_mesh(bucket_cifar10):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ctm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from ctm_jax import storage  # pylint: disable=g-import-not-at-top
  from ctm_jax import train  # pylint: disable=g-import-not-at-top
  from ctm_jax.configs import cifar10  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  if jax.device_count() < 8:
    pytest.skip('needs XLA_FLAGS=--xla_force_host_platform_device_count=8')
  flags.FLAGS.mark_as_parsed()
  workdir = f'gs://test-bucket/{uuid.uuid4().hex[:12]}/run'
  config = cifar10.get_config('smoke')
  config.data_dir = bucket_cifar10[1]
  config.batch_size = config.batch_size_test = 4
  config.n_test_batches = 1
  config.training_iterations = config.save_every = config.log_every = config.track_every = 2
  config.warmup_steps = 1
  config.mesh.data, config.mesh.fsdp, config.mesh.neuron = 2, 2, 2
  train.train_and_evaluate(config, workdir)
  config.training_iterations = 4
  config.mesh.data, config.mesh.fsdp, config.mesh.neuron = 4, 1, 2
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 4
  assert checkpoint.committed_steps(storage.join(workdir, 'checkpoints')) == [2, 4]
  lines = storage.path(storage.join(workdir, 'metrics.jsonl')).read_text().splitlines()
  steps = [json.loads(line)['step'] for line in lines if 'train/loss' in line]
  assert steps == [2, 4]


def test_maze_folders_in_the_bucket_read_as_from_disk(emulator, tmp_path):
  del emulator
  from ctm_jax import storage  # pylint: disable=g-import-not-at-top
  from ctm_jax.configs import mazes as mazes_config  # pylint: disable=g-import-not-at-top
  from ctm_jax.data import mazes  # pylint: disable=g-import-not-at-top

  config = mazes_config.get_config('smoke')
  size = config.image_shape[0]
  local = tmp_path / 'mazes'
  for split, n in (('train', 5), ('test', 3)):
    generated = mazes.GeneratedMazes(size, config.maze_route_length, 0, n, split)
    for i in range(n):
      folder = local / split / str(i % 2)
      folder.mkdir(parents=True, exist_ok=True)
      mazes.write_png(str(folder / f'{i}.png'), generated[i]['image'])
  (local / 'train' / 'notes.txt').write_text('not a maze')  # beside the class folders: ignored
  bucket = f'gs://test-bucket/{uuid.uuid4().hex[:12]}/mazes'
  storage.copy_up(str(local), bucket)
  for split, n in (('train', 5), ('test', 3)):
    from_disk = mazes.MazeFolder(str(local), split, config.maze_route_length)
    from_bucket = mazes.MazeFolder(bucket, split, config.maze_route_length)
    assert len(from_bucket) == n
    assert [p.split(split + '/', 1)[1] for p in from_bucket.paths] == [
        p.split(split + '/', 1)[1] for p in from_disk.paths]
    for i in range(n):
      np.testing.assert_array_equal(from_bucket[i]['image'], from_disk[i]['image'])
      np.testing.assert_array_equal(from_bucket[i]['route'], from_disk[i]['route'])
  config.data_dir = bucket
  records = mazes.train_source(config)
  assert len(records) == 5 and records[0]['inputs'].shape == tuple(config.image_shape)
  config.data_dir = storage.join(bucket, 'train')  # a split folder, not the root
  with pytest.raises(ValueError, match=r'config\.data_dir=.*: no train/ folder of maze PNGs there'):
    mazes.check_config(config)
