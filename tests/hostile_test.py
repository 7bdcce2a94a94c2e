"""A hostile user against every command around the trainer.

Each case runs a command as a user would (`python -m ...`) on a small world of
real folders (a training run, its artefact, its Hub-format copy, an import of
that, a generated maze dataset, a user's own folder) and asserts: the exit
code, one error line with no traceback, the path/field/value it names, and
that every file that existed before is byte-identical afterwards (nothing
replaced, deleted or moved). Cases that must succeed say so (exit 0).

The classes (docs/testing.md): commands that would replace what is not theirs;
readers of damaged checkpoints, artefacts and imports; unbounded inputs and
values; silent bad input. The default tier runs a few of each class; the
rest are `slow` (each case is a fresh process, ~2 s).
"""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_TIMEOUT = 180
_PREFIX = {
    'ctm_jax.main': 'ctm_jax.main:',
    'ctm_jax.export': 'ctm_jax.export:',
    'ctm_jax.predict': 'ctm_jax.predict:',
    'ctm_jax.evaluate': 'ctm_jax.evaluate:',
    'ctm_jax.interop.torch': 'error:',
    'ctm_jax.data.mazes': 'error:',
    'ctm_jax.tools.mazes_generalisation': 'mazes_generalisation:',
}


def _snapshot(root: pathlib.Path) -> dict[str, str]:
  """Relative path -> sha256 of every file under `root` (links and pipes skipped)."""
  found = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = pathlib.Path(folder) / name
      if path.is_file() and not path.is_symlink():
        found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
  return found


def _command(module, *args, timeout=_TIMEOUT):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', PYTHONUNBUFFERED='1')
  try:
    return subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    pytest.fail(f'{module} {args} hung: no exit within {timeout} s')


def refused(root, module, *args, names=(), code=2):
  """Runs the command; asserts `code`, one error line naming each of `names`,
  no traceback, and every file under `root` as it was. Returns the line."""
  before = _snapshot(root)
  result = _command(module, *args)
  output = result.stdout + result.stderr
  assert 'Traceback' not in output, output[-4000:]
  assert result.returncode == code, f'exit {result.returncode}:\n{output[-4000:]}'
  lines = [line for line in result.stderr.splitlines() if line.startswith(_PREFIX[module])]
  assert len(lines) == 1, output[-4000:]
  for name in names:
    assert str(name) in lines[0], lines[0]
  after = _snapshot(root)
  changed = [p for p in before if after.get(p) != before[p]]
  assert not changed, f'changed or removed: {changed[:5]}'
  return lines[0]


def accepted(root, module, *args, keep=()):
  """Runs the command; asserts exit 0 and the files under each of `keep` as they were."""
  before = {k: _snapshot(k) for k in keep}
  result = _command(module, *args)
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  for k in keep:
    assert _snapshot(k) == before[k], f'{k} changed'
  del root
  return result


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """Folders of every kind the commands write, made once."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ctm_jax import export  # pylint: disable=g-import-not-at-top
  from ctm_jax import train  # pylint: disable=g-import-not-at-top
  from ctm_jax.configs import parity  # pylint: disable=g-import-not-at-top
  from ctm_jax.data import mazes  # pylint: disable=g-import-not-at-top
  from ctm_jax.interop import torch as torch_interop  # pylint: disable=g-import-not-at-top

  flags.FLAGS.mark_as_parsed()
  root = tmp_path_factory.mktemp('world')
  config = parity.get_config('smoke')
  config.training_iterations, config.save_every, config.keep_checkpoints = 4, 2, 5
  config.log_every = config.track_every = 2
  config.warmup_steps = 1
  train.train_and_evaluate(config, str(root / 'run'))
  export.export(str(root / 'run'), str(root / 'artefact'))
  export.export_hf(str(root / 'run'), str(root / 'hub'))
  torch_interop.import_checkpoint(str(root / 'hub'), str(root / 'imported'))
  mazes.write_dataset(str(root / 'mazes'), size=7, train=2, test=1, seed=0)
  (root / 'foreign').mkdir()
  (root / 'foreign' / 'notes.txt').write_text('a user\'s own file')
  bits = np.sign(np.random.default_rng(0).standard_normal(config.parity_sequence_length))
  np.save(root / 'bits.npy', bits.astype(np.float32))
  return root


def _copy(world, name, tmp_path) -> pathlib.Path:
  target = tmp_path / name
  shutil.copytree(world / name, target)
  return target


def _flip(path: pathlib.Path, at: int = -1):
  data = bytearray(path.read_bytes())
  data[at] ^= 0xFF
  path.write_bytes(bytes(data))


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


# ---------------------------------------------------------------------------
# 1. Nothing replaced or deleted that the command did not write.


def test_import_into_a_training_run_is_refused(world):
  refused(world, 'ctm_jax.interop.torch', f'--checkpoint={world / "hub"}', f'--workdir={world / "run"}',
          names=(world / 'run', 'holds a training run'))


@pytest.mark.slow
def test_import_overwrite_never_replaces_a_training_run(world):
  refused(world, 'ctm_jax.interop.torch', f'--checkpoint={world / "hub"}', f'--workdir={world / "run"}',
          '--overwrite', names=('holds a training run', '--overwrite never replaces one'))


@pytest.mark.slow
def test_import_into_a_foreign_folder_is_refused(world):
  refused(world, 'ctm_jax.interop.torch', f'--checkpoint={world / "hub"}',
          f'--workdir={world / "foreign"}', '--overwrite', names=(world / 'foreign', 'no ctm_jax command wrote'))


@pytest.mark.slow
def test_import_over_an_import_needs_overwrite(world):
  refused(world, 'ctm_jax.interop.torch', f'--checkpoint={world / "hub"}', f'--workdir={world / "imported"}',
          names=('already holds an imported model', '--overwrite'))


@pytest.mark.slow
def test_import_waits_for_no_one_a_locked_workdir_is_refused(world, tmp_path):
  from ctm_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  target = tmp_path / 'busy'
  target.mkdir()
  with workdir_lib.Lock(str(target)):
    refused(tmp_path, 'ctm_jax.interop.torch', f'--checkpoint={world / "hub"}', f'--workdir={target}',
            names=(target, 'in use by another run'))
  assert sorted(os.listdir(target)) == ['.lock']


def test_export_overwrite_never_deletes_a_training_run(world):
  refused(world, 'ctm_jax.export', f'--workdir={world / "artefact"}', f'--out={world / "run"}', '--overwrite',
          names=(world / 'run', 'holds a training run', 'replaces only an exported artefact'))


@pytest.mark.slow
def test_export_overwrite_never_deletes_a_foreign_folder(world):
  refused(world, 'ctm_jax.export', f'--workdir={world / "run"}', f'--out={world / "foreign"}', '--overwrite',
          names=(world / 'foreign', 'no ctm_jax command wrote'))


@pytest.mark.slow
def test_export_over_an_artefact_needs_overwrite(world):
  refused(world, 'ctm_jax.export', f'--workdir={world / "run"}', f'--out={world / "artefact"}',
          names=('already holds an exported artefact', '--overwrite'))


@pytest.mark.slow
def test_export_hf_overwrite_never_replaces_an_import(world):
  refused(world, 'ctm_jax.export', f'--workdir={world / "run"}', '--format=hf', f'--out={world / "imported"}',
          '--overwrite', names=('holds an imported model', 'replaces only a model in the Hub format'))


@pytest.mark.slow
def test_export_leaves_a_users_tmp_folder_alone(world, tmp_path):
  out = tmp_path / 'artefact'
  users = tmp_path / 'artefact.tmp'
  users.mkdir()
  (users / 'mine.txt').write_text('not a leftover of export')
  accepted(tmp_path, 'ctm_jax.export', f'--workdir={world / "run"}', f'--out={out}', keep=(users,))
  assert (out / 'model.json').is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['artefact', 'artefact.tmp']


@pytest.mark.slow
def test_export_overwrite_replaces_its_own_artefact(world, tmp_path):
  out = _copy(world, 'artefact', tmp_path)
  accepted(tmp_path, 'ctm_jax.export', f'--workdir={world / "run"}', f'--out={out}', '--overwrite',
           '--step=2', keep=(world / 'run',))
  assert '"step": 2' in (out / 'model.json').read_text()


def test_maze_generator_never_mixes_into_a_dataset(world):
  refused(world, 'ctm_jax.data.mazes', f'--out={world / "mazes"}', '--size=7', '--train=2', '--test=1',
          '--seed=1', names=(world / 'mazes', 'already holds a generated maze dataset', '--overwrite'))


@pytest.mark.slow
def test_maze_generator_never_writes_into_a_foreign_folder(world):
  refused(world, 'ctm_jax.data.mazes', f'--out={world / "foreign"}', '--size=7', '--train=1', '--test=1',
          '--overwrite', names=(world / 'foreign', 'no ctm_jax command wrote'))


@pytest.mark.slow
def test_maze_generator_overwrite_never_replaces_a_run(world):
  refused(world, 'ctm_jax.data.mazes', f'--out={world / "run"}', '--size=7', '--train=1', '--test=1',
          '--overwrite', names=('holds a training run',))


def test_maze_generator_overwrite_replaces_its_own_dataset(world, tmp_path):
  out = _copy(world, 'mazes', tmp_path)
  accepted(tmp_path, 'ctm_jax.data.mazes', f'--out={out}', '--size=9', '--train=1', '--test=1', '--overwrite')
  assert sorted(p.name for p in (out / 'train' / 'mazes').iterdir()) == ['0.png']
  assert '"size": 9' in (out / 'mazes.json').read_text()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['mazes']  # no scratch left beside it


def test_evaluate_never_writes_into_a_foreign_folder(world):
  refused(world, 'ctm_jax.evaluate', f'--workdir={world / "run"}', f'--out={world / "foreign"}',
          names=(world / 'foreign', 'no ctm_jax command wrote'))


@pytest.mark.slow
def test_evaluate_never_writes_over_a_training_run(world):
  refused(world, 'ctm_jax.evaluate', f'--workdir={world / "artefact"}', f'--out={world / "run"}', '--overwrite',
          names=('holds a training run',))


# ---------------------------------------------------------------------------
# 2. One integrity path for every reader.


@pytest.mark.slow
def test_predict_passes_over_a_damaged_newest_step_and_says_so(world, tmp_path):
  run = _copy(world, 'run', tmp_path)
  _flip(_largest_file(run / 'checkpoints' / '4'))
  before = _snapshot(run)
  result = accepted(tmp_path, 'ctm_jax.predict', f'--workdir={run}', '--input=10101101')
  warnings = [line for line in result.stderr.splitlines() if 'newest intact' in line]
  assert len(warnings) == 1 and 'Using checkpoint step 2' in warnings[0] and 'step 4' in warnings[0], result.stderr
  assert _snapshot(run) == before  # a reader moves nothing aside


def test_predict_of_a_damaged_step_asked_for_is_refused_naming_it(world, tmp_path):
  run = _copy(world, 'run', tmp_path)
  _flip(_largest_file(run / 'checkpoints' / '4'))
  refused(tmp_path, 'ctm_jax.predict', f'--workdir={run}', '--input=1010', '--step=4',
          names=('--step=4', 'is damaged', 'checksum', 'committed: [2]'))


@pytest.mark.slow
def test_evaluate_falls_back_past_a_truncated_step(world, tmp_path):
  run = _copy(world, 'run', tmp_path)
  victim = _largest_file(run / 'checkpoints' / '4')
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  result = accepted(tmp_path, 'ctm_jax.evaluate', f'--workdir={run}', '--n_test_batches=1')
  assert 'Using checkpoint step 2' in result.stderr and (run / 'eval_2' / 'metrics.json').is_file()
  assert not (run / 'eval_4').exists()


@pytest.mark.slow
def test_a_truncated_step_without_a_manifest_is_passed_over_too(world, tmp_path):
  run = _copy(world, 'run', tmp_path)
  (run / 'checksums' / '4.json').unlink()
  for victim in (run / 'checkpoints' / '4' / 'state').rglob('*'):
    if victim.is_file():  # an interrupted copy: every file cut short
      victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  result = accepted(tmp_path, 'ctm_jax.predict', f'--workdir={run}', '--input=10101101')
  assert 'Using checkpoint step 2' in result.stderr and 'does not restore' in result.stderr, result.stderr


@pytest.mark.slow
def test_export_of_a_run_with_no_intact_step_is_refused(world, tmp_path):
  run = _copy(world, 'run', tmp_path)
  for step in ('2', '4'):
    _flip(_largest_file(run / 'checkpoints' / step))
  refused(tmp_path, 'ctm_jax.export', f'--workdir={run}', f'--out={tmp_path / "out"}',
          names=(run, 'no intact checkpoint', 'step 4'))
  assert not (tmp_path / 'out').exists()


def test_an_artefact_with_flipped_variables_is_refused(world, tmp_path):
  artefact = _copy(world, 'artefact', tmp_path)
  _flip(_largest_file(artefact / 'variables'))
  refused(tmp_path, 'ctm_jax.predict', f'--workdir={artefact}', '--input=1010',
          names=(artefact, 'the artefact is damaged', 'checksum', 're-export'))


@pytest.mark.slow
def test_an_artefact_with_a_truncated_program_is_refused(world, tmp_path):
  artefact = _copy(world, 'artefact', tmp_path)
  program = artefact / 'forward.jax_export'
  program.write_bytes(program.read_bytes()[:64])
  refused(tmp_path, 'ctm_jax.evaluate', f'--workdir={artefact}', '--n_test_batches=1',
          f'--out={tmp_path / "eval"}', names=('forward.jax_export is 64 bytes',))


@pytest.mark.slow
def test_an_artefact_with_a_tampered_model_json_is_refused(world, tmp_path):
  artefact = _copy(world, 'artefact', tmp_path)
  spec = artefact / 'model.json'
  spec.write_text(spec.read_text().replace('"d_model": ', '"d_model": 1', 1))
  refused(tmp_path, 'ctm_jax.predict', f'--workdir={artefact}', '--input=1010', names=('model.json',))


@pytest.mark.slow
def test_an_artefact_without_a_manifest_whose_model_json_was_edited_is_refused(world, tmp_path):
  import json  # pylint: disable=g-import-not-at-top

  artefact = _copy(world, 'artefact', tmp_path)
  (artefact / 'checksums.json').unlink()  # as an artefact from before manifests
  spec = json.loads((artefact / 'model.json').read_text())
  spec['model_kwargs']['d_model'] += 1
  (artefact / 'model.json').write_text(json.dumps(spec))
  refused(tmp_path, 'ctm_jax.predict', f'--workdir={artefact}', '--input=1010',
          names=('model.json: its model_kwargs make', 'the stored variables hold', 're-export'))


@pytest.mark.slow
def test_an_artefact_asking_for_a_million_ticks_is_refused(world, tmp_path):
  import json  # pylint: disable=g-import-not-at-top

  artefact = _copy(world, 'artefact', tmp_path)
  (artefact / 'checksums.json').unlink()  # as an artefact from before manifests
  spec = json.loads((artefact / 'model.json').read_text())
  spec['model_kwargs']['iterations'] = 1_000_000
  (artefact / 'model.json').write_text(json.dumps(spec))
  refused(tmp_path, 'ctm_jax.predict', f'--workdir={artefact}', '--input=1010',
          names=('model_kwargs.iterations=1000000', 'out of range'))


def test_an_import_with_flipped_weights_is_refused(world, tmp_path):
  imported = _copy(world, 'imported', tmp_path)
  _flip(_largest_file(imported / 'checkpoint'))
  refused(tmp_path, 'ctm_jax.predict', f'--workdir={imported}', '--input=1010',
          names=(imported, 'the import is damaged', 'import it again'))


@pytest.mark.slow
def test_init_from_a_damaged_import_is_refused(world, tmp_path):
  imported = _copy(world, 'imported', tmp_path)
  _flip(_largest_file(imported / 'checkpoint'))
  refused(tmp_path, 'ctm_jax.main', '--config=configs/parity.py:smoke', f'--workdir={tmp_path / "run"}',
          f'--config.init_from={imported}', names=('the import is damaged',))
  assert not (tmp_path / 'run' / 'checkpoints').exists()


# ---------------------------------------------------------------------------
# 3. Bounded: inputs, models, generator and artefact values.


def test_a_pipe_as_input_is_refused_not_waited_on(world, tmp_path):
  fifo = tmp_path / 'input.png'
  os.mkfifo(fifo)
  refused(tmp_path, 'ctm_jax.predict', f'--workdir={world / "run"}', f'--input={fifo}',
          names=(fifo, 'not a regular file'))


@pytest.mark.slow
def test_a_device_as_input_is_refused(world):
  refused(world, 'ctm_jax.predict', f'--workdir={world / "run"}', '--input=/dev/zero',
          names=('/dev/zero', 'not a regular file'))


def test_a_huge_input_file_is_refused_unread(world, tmp_path):
  huge = tmp_path / 'huge.npy'
  with open(huge, 'wb') as f:
    f.truncate(65 << 20)  # sparse: no disk used
  refused(tmp_path, 'ctm_jax.predict', f'--workdir={world / "run"}', f'--input={huge}',
          names=(huge, 'over the'))


def test_a_model_too_big_for_memory_is_refused_before_allocation(tmp_path):
  line = refused(tmp_path, 'ctm_jax.main', '--config=configs/parity.py:smoke', f'--workdir={tmp_path / "run"}',
                 '--config.model.d_model=2000000', names=('config.model', 'GiB', 'make the model smaller'))
  assert 'needs ~' in line
  assert not (tmp_path / 'run').exists()


def test_a_batch_whose_activations_cannot_fit_is_refused_before_allocation(tmp_path):
  line = refused(tmp_path, 'ctm_jax.main', '--config=configs/parity.py:smoke', f'--workdir={tmp_path / "run"}',
                 '--config.batch_size=4000000', names=('config.batch_size=4000000', 'activations', 'remat'))
  assert 'GiB' in line
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize('flag, named', [
    ('--size=3', '--size=3'), ('--size=100001', '--size=100001'), ('--size=8', '--size=8'),
    ('--train=-5', '--train=-5'), ('--train=0', 'nothing to write'),
])
def test_maze_generator_values_are_range_checked(tmp_path, flag, named):
  args = ['--size=7', '--train=1', '--test=0', flag]
  refused(tmp_path, 'ctm_jax.data.mazes', f'--out={tmp_path / "mazes"}', *args, names=(named,))
  assert not (tmp_path / 'mazes').exists()


def test_generalisation_sizes_are_range_checked(world):
  refused(world, 'ctm_jax.tools.mazes_generalisation', f'--workdir={world / "run"}', '--sizes=11,3',
          names=("--sizes='11,3'", 'in [5, 1001]'))


# ---------------------------------------------------------------------------
# 4. One line for every mistake; bad values refused, not run.


@pytest.mark.parametrize('value', [np.nan, np.inf])
def test_non_finite_input_is_refused(world, tmp_path, value):
  path = tmp_path / 'bad.npy'
  bits = np.load(world / 'bits.npy')
  bits[3] = value
  np.save(path, bits)
  refused(tmp_path, 'ctm_jax.predict', f'--workdir={world / "run"}', f'--input={path}',
          names=(path, 'NaN or infinite'))


@pytest.mark.parametrize('flag, named', [('--max_ticks=0', '--max_ticks=0'), ('--threshold=-1', '--threshold=-1.0')])
def test_predict_values_are_checked(world, flag, named):
  refused(world, 'ctm_jax.predict', f'--workdir={world / "run"}', '--input=1010', flag, names=(named,))


def test_evaluate_of_a_step_that_does_not_exist_names_the_committed_ones(world):
  refused(world, 'ctm_jax.evaluate', f'--workdir={world / "run"}', '--step=999',
          names=('--step=999', 'committed: [2, 4]'))


def test_export_of_a_missing_workdir_is_one_line(world, tmp_path):
  refused(tmp_path, 'ctm_jax.export', f'--workdir={tmp_path / "nowhere"}', f'--out={tmp_path / "out"}',
          names=(tmp_path / 'nowhere',))


def test_predict_on_a_foreign_folder_is_one_line(world):
  refused(world, 'ctm_jax.predict', f'--workdir={world / "foreign"}', '--input=1010',
          names=(world / 'foreign', 'config.json'))


def test_predict_asking_a_step_of_an_artefact_is_one_line(world):
  refused(world, 'ctm_jax.predict', f'--workdir={world / "artefact"}', '--input=1010', '--step=2',
          names=('--step=2', 'artefact holds one step'))


def _maze_folder(root: pathlib.Path, size: int, spoil) -> pathlib.Path:
  from ctm_jax.data import mazes  # pylint: disable=g-import-not-at-top

  folder = root / 'mazes'
  for split in ('train', 'test'):
    generated = mazes.GeneratedMazes(size, 100, 0, 2, split)
    (folder / split / '0').mkdir(parents=True)
    for i in range(2):
      mazes.write_png(str(folder / split / '0' / f'{i}.png'), generated[i]['image'])
  spoil(folder / 'train' / '0' / '1.png')
  return folder


def _two_starts(path):
  from ctm_jax.data import mazes  # pylint: disable=g-import-not-at-top

  image = mazes.read_png(str(path))
  free = np.argwhere(np.all(image == 1, axis=-1))
  image[tuple(free[0])] = mazes.START
  mazes.write_png(str(path), image)


@pytest.mark.slow
@pytest.mark.parametrize('spoil, named', [
    (lambda p: p.write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 40), 'not a maze picture PIL can read'),
    (_two_starts, '2 start (red)'),
], ids=['corrupt_png', 'two_starts'])
def test_a_bad_picture_in_a_maze_folder_is_named(tmp_path, spoil, named):
  from ctm_jax.configs import mazes as mazes_config  # pylint: disable=g-import-not-at-top

  size = mazes_config.get_config('smoke').image_shape[0]
  folder = _maze_folder(tmp_path, size, spoil)
  refused(tmp_path, 'ctm_jax.main', '--config=configs/mazes.py:smoke', f'--workdir={tmp_path / "run"}',
          f'--config.data_dir={folder}', names=(folder / 'train' / '0' / '1.png', named))


def test_a_loss_grown_by_orders_of_magnitude_is_flagged_in_metrics_and_on_the_progress_line():
  import types  # pylint: disable=g-import-not-at-top
  from ctm_jax import train  # pylint: disable=g-import-not-at-top

  window = train.MetricWindow(types.SimpleNamespace(unit='step'), None, None, 10, None)
  flags, postfixes = [], []
  for step, loss in enumerate([2.3, 1.0, 0.5, 40.0, 80.0, 1e7, float('nan')]):
    scalars, postfix = {'train/loss': loss}, {}
    window._diverging(step, scalars, postfix)  # pylint: disable=protected-access
    flags.append(scalars.get('train/diverging'))
    postfixes.append('DIVERGING' in postfix)
  assert flags == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, None]
  assert postfixes == [False, False, False, False, True, True, False]


def test_a_step_rotated_away_while_read_is_chosen_again(world, tmp_path):
  """A trainer still running deletes its oldest step while a reader restores it."""
  from ctm_jax import checkpoint  # pylint: disable=g-import-not-at-top

  run = _copy(world, 'run', tmp_path)
  asked = []

  def restore(step):
    asked.append(step)
    if step == 4:  # the trainer rotates 4 away (and saves 6) mid-read
      shutil.copytree(run / 'checkpoints' / '4', run / 'checkpoints' / '6')
      shutil.copy(run / 'checksums' / '4.json', run / 'checksums' / '6.json')
      shutil.rmtree(run / 'checkpoints' / '4')
      raise FileNotFoundError('gone')
    return f'state {step}'

  assert checkpoint.restore_intact(str(run), None, restore) == (6, 'state 6')
  assert asked == [4, 6]
  with pytest.raises(ValueError, match=r'--step=2: the checkpoint was deleted while it was read'):
    checkpoint.restore_intact(str(run), 2, lambda step: shutil.rmtree(run / 'checkpoints' / '2') or 1 / 0)
