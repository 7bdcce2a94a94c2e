"""Maze data: the generator, the reference's PNG format and routes, augmentation."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import chex
import numpy as np
import pytest

from ctm_jax.data import mazes

REPO = pathlib.Path(__file__).resolve().parents[1]


def _walk(image_HxWx3, route_R):
  """Follows a route from red; returns the pixel it ends on, failing on a wall."""
  free_HxW = ~np.all(image_HxWx3 == 0, axis=-1)
  y, x = np.argwhere(mazes._is(image_HxWx3, mazes.START))[0]
  for move in route_R:
    if move == mazes.WAIT:
      break
    dy, dx = mazes.MOVE_DELTAS[move]
    y, x = y + dy, x + dx
    assert free_HxW[y, x], f'the route enters a wall at {(y, x)}'
  return int(y), int(x)


def _goal(image_HxWx3):
  return tuple(int(v) for v in np.argwhere(mazes._is(image_HxWx3, mazes.GOAL))[0])


def test_generation_is_seeded_by_split_seed_and_index():
  source = mazes.GeneratedMazes(15, 60, seed=3, num_records=100)
  a, b = source[7], source[7]
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['route'], b['route'])
  others = [
      source[8],
      mazes.GeneratedMazes(15, 60, seed=4, num_records=100)[7],
      mazes.GeneratedMazes(15, 60, seed=3, num_records=100, split='test')[7],
  ]
  for other in others:
    assert not np.array_equal(a['image'], other['image'])


@pytest.mark.parametrize('size', [3, 15, 39])
def test_every_maze_is_perfect_and_solvable(size):
  n = (size - 1) // 2
  rng = np.random.default_rng(0)
  for _ in range(20):
    free_HxW = mazes.generate(size, rng)
    # A spanning tree of the n x n cells: n*n - 1 passages, and every cell reached.
    cells_HxW = np.zeros_like(free_HxW)
    cells_HxW[1::2, 1::2] = True
    assert free_HxW[cells_HxW].all()
    assert free_HxW[~cells_HxW].sum() == n * n - 1
    assert not free_HxW[0].any() and not free_HxW[-1].any()
    assert not free_HxW[:, 0].any() and not free_HxW[:, -1].any()
    reached = {p for p in np.ndindex(*free_HxW.shape) if free_HxW[p] and mazes.shortest_path(free_HxW, (1, 1), p)}
    assert len(reached) == free_HxW.sum()


def test_route_is_the_shortest_path_and_reaches_the_goal():
  source = mazes.GeneratedMazes(21, 400, seed=0, num_records=50)
  for index in range(30):
    record = source[index]
    image, route = record['image'], record['route']
    assert _walk(image, route) == _goal(image)
    free_HxW = ~np.all(image == 0, axis=-1)
    start = tuple(np.argwhere(mazes._is(image, mazes.START))[0])
    path = mazes.shortest_path(free_HxW, start, _goal(image))
    assert (route != mazes.WAIT).sum() == len(path) - 1
    # The blue pixels are exactly the path between red and green.
    assert mazes._is(image, mazes.PATH).sum() == len(path) - 2


def test_route_is_cut_and_padded_to_route_length():
  record = mazes.GeneratedMazes(21, 400, seed=0, num_records=5)[0]
  moves = int((record['route'] != mazes.WAIT).sum())
  short = mazes.route_from_image(record['image'], moves // 2)
  np.testing.assert_array_equal(short, record['route'][: moves // 2])
  long = mazes.route_from_image(record['image'], moves + 7)
  assert list(long[moves:]) == [mazes.WAIT] * 7


def test_png_round_trip_and_reference_reader(tmp_path):
  mazes.write_dataset(str(tmp_path), size=15, train=6, test=3, seed=5, route_length=100)
  assert len(os.listdir(tmp_path / 'train' / 'mazes')) == 6
  generated = mazes.GeneratedMazes(15, 100, seed=5, num_records=6)
  folder = mazes.MazeFolder(str(tmp_path), 'train', route_length=100)
  assert len(folder) == 6
  for index in range(6):
    np.testing.assert_array_equal(folder[index]['image'], generated[index]['image'])
    np.testing.assert_array_equal(folder[index]['route'], generated[index]['route'])
  with pytest.raises(FileNotFoundError, match='no such maze folder'):
    mazes.MazeFolder(str(tmp_path), 'val', route_length=100)


def test_augmentation_keeps_every_route_valid():
  source = mazes.GeneratedMazes(15, 100, seed=1, num_records=20)
  rng = np.random.default_rng(0)
  transforms = set()
  for index in range(20):
    record = source[index]
    for _ in range(10):
      image, route = mazes.augment(record['image'], record['route'], rng, p=0.5)
      assert _walk(image, route) == _goal(image)
      np.testing.assert_array_equal(mazes.route_from_image(image, 100), route)
      transforms.add(image.tobytes())
  assert len(transforms) > 100  # rotations and flips really happen


def test_model_input_whitens_the_path_and_expands_the_range():
  image = mazes.GeneratedMazes(15, 100, seed=2, num_records=1)[0]['image']
  x = mazes.model_input(image)
  assert x.min() == -1 and x.max() == 1
  assert not mazes._is((x + 1) / 2, mazes.PATH).any()
  assert mazes._is((x + 1) / 2, mazes.START).sum() == 1 and mazes._is((x + 1) / 2, mazes.GOAL).sum() == 1
  walls = np.all(image == 0, axis=-1)
  np.testing.assert_array_equal(np.all(x == -1, axis=-1), walls)
  # The reference's --no-expand_range: the whitened picture as it is, in [0, 1].
  np.testing.assert_array_equal(mazes.model_input(image, expand_range=False), (x + 1) / 2)


def test_bad_size_is_named():
  with pytest.raises(ValueError, match='maze size 20: must be odd'):
    mazes.GeneratedMazes(20, 10, seed=0, num_records=1)


def test_command_writes_the_reference_layout(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'ctm_jax.data.mazes', f'--out={tmp_path}', '--size=11', '--train=3', '--test=2', '--seed=1'],
      cwd=REPO, capture_output=True, text=True, timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(tmp_path / 'train' / 'mazes')) == ['0.png', '1.png', '2.png']
  assert sorted(os.listdir(tmp_path / 'test' / 'mazes')) == ['0.png', '1.png']
  image = mazes.read_png(str(tmp_path / 'test' / 'mazes' / '1.png'))
  np.testing.assert_array_equal(image, mazes.GeneratedMazes(11, 100, 1, 2, 'test')[1]['image'])


def _smoke_config():
  from ctm_jax.configs import mazes as maze_configs  # pylint: disable=g-import-not-at-top

  config = maze_configs.get_config('smoke')
  config.save_every = 2
  return config


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """The smoke config trained on generated mazes over the 8-device mesh."""
  import jax  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  from ctm_jax import train  # pylint: disable=g-import-not-at-top

  flags.FLAGS.mark_as_parsed()
  assert jax.device_count() == 8  # the default mesh spreads the batch over all eight
  workdir = tmp_path_factory.mktemp('mazes') / 'generated'
  return workdir, train.train_and_evaluate(_smoke_config(), str(workdir))


@pytest.mark.slow  # a sharded training run, about 30 s on 2 cores
def test_maze_smoke_trains_evaluates_and_draws_on_generated_mazes(smoke_run):
  """No download: the smoke config trains and evaluates, sharded, on generated
  mazes; the route gifs have a frame per tick, the solve rate a per-tick plot."""
  workdir, state = smoke_run
  config = _smoke_config()
  assert int(state.step) == config.training_iterations
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').open()]
  evals = [r for r in records if 'eval/acc_most_certain' in r]
  assert evals and 0 <= evals[-1]['eval/acc_most_certain'] <= 1
  ticks = config.model.iterations
  for prefix in ('eval', 'train'):
    record = next(r for r in records if f'{prefix}/solved_most_certain' in r)
    assert {f'{prefix}/solved_last', f'{prefix}/solved_tick_{ticks - 1}'} <= set(record)
  assert (workdir / 'plots' / f'eval_solved_{config.training_iterations:07d}.png').exists()

  from PIL import Image  # pylint: disable=g-import-not-at-top

  gifs = sorted((workdir / 'plots').glob('route_*.gif'))
  assert len(gifs) == config.n_route_gifs, gifs
  with Image.open(gifs[0]) as gif:
    assert gif.n_frames == ticks


@pytest.mark.slow  # a resumed sharded run
def test_maze_smoke_resumes_bit_identically(smoke_run, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top

  from ctm_jax import train  # pylint: disable=g-import-not-at-top

  workdir, uninterrupted = smoke_run
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(resumed_dir / 'checkpoints' / '4')  # back to step 2
  resumed = train.train_and_evaluate(_smoke_config(), str(resumed_dir))
  assert int(resumed.step) == 4
  chex.assert_trees_all_equal(resumed, uninterrupted)


@pytest.mark.slow  # the command on the trained smoke model
def test_generalisation_command_reports_bigger_mazes(smoke_run, tmp_path):
  workdir, _ = smoke_run
  out = tmp_path / 'gen'
  proc = subprocess.run(
      [
          sys.executable, '-m', 'ctm_jax.tools.mazes_generalisation', f'--workdir={workdir}',
          '--sizes=15,31', '--count=6', '--max_reapplications=3', '--pictures=2', f'--out={out}',
      ],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1'),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| 15 | 6 |' in proc.stdout and '| 31 | 6 |' in proc.stdout, proc.stdout
  results = json.loads((out / 'results.json').read_text())
  for size in ('15', '31'):
    entry = results['sizes'][size]
    assert len(entry['solved']) == 6 and all(1 <= a <= 3 for a in entry['applications'])
    assert (out / f'route_{size}_1.png').exists()


@pytest.mark.slow  # a sharded training run
def test_maze_smoke_trains_on_a_reference_folder(tmp_path):
  from absl import flags  # pylint: disable=g-import-not-at-top

  from ctm_jax import train  # pylint: disable=g-import-not-at-top

  flags.FLAGS.mark_as_parsed()
  config = _smoke_config()
  mazes.write_dataset(str(tmp_path / 'folder'), size=15, train=40, test=32, seed=9)
  config.data_dir = str(tmp_path / 'folder')
  state = train.train_and_evaluate(config, str(tmp_path / 'read'))
  assert int(state.step) == config.training_iterations
  config.data_dir = str(tmp_path / 'nowhere')
  with pytest.raises(ValueError, match=r"config\.data_dir=.*nowhere.*no train/ folder"):
    train.train_and_evaluate(config, str(tmp_path / 'refused'))
  assert not (tmp_path / 'refused').exists()


def test_solve_rate_counts_whole_routes_per_tick():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from ctm_jax import tasks  # pylint: disable=g-import-not-at-top
  from ctm_jax.models import ctm  # pylint: disable=g-import-not-at-top

  task = tasks.get('mazes')
  targets_BxR = np.array([[0, 3, 4], [1, 1, 2]], np.int32)
  # Tick 0: both routes right; tick 1: example 1 wrong at its last step.
  logits_BxRx5xT = np.zeros((2, 3, 5, 2), np.float32)
  for b in range(2):
    for r in range(3):
      logits_BxRx5xT[b, r, targets_BxR[b, r], :] = 1.0
  logits_BxRx5xT[1, 2, :, 1] = 0.0
  logits_BxRx5xT[1, 2, 0, 1] = 1.0
  output = ctm.CTMOutput(
      predictions=jnp.asarray(logits_BxRx5xT.reshape(2, 15, 2)),
      certainties=jnp.zeros((2, 2, 2)),
      synch_out=jnp.zeros((2, 1)),
  )
  batch = {'targets': jnp.asarray(targets_BxR)}
  aux = {'most_certain_B': jnp.array([1, 1])}
  metrics = task.train_metrics(None, output, batch, jnp.float32(0), aux)
  np.testing.assert_array_equal(metrics['solved_tick_sum'], [2, 1])
  assert float(metrics['solved_most_certain_sum']) == 1 and float(metrics['solved_last_sum']) == 1
  np.testing.assert_allclose(metrics['acc_tick_sum'], [2, 1 + 2 / 3])
  arrays = task.eval_arrays(None, output, batch, aux)
  np.testing.assert_array_equal(arrays['solved_BxT'], [[1, 1], [1, 0]])


def test_a_folder_of_another_size_is_named_before_training(tmp_path):
  from ctm_jax.configs import mazes as maze_configs  # pylint: disable=g-import-not-at-top

  mazes.write_dataset(str(tmp_path / 'folder'), size=15, train=3, test=2, seed=0)
  config = maze_configs.get_config('small')  # 11x11
  config.data_dir = str(tmp_path / 'folder')
  with pytest.raises(ValueError, match=r"config\.image_shape=\(11, 11, 3\).*\(15, 15, 3\).*--config\.image_shape="):
    mazes.check_config(config)
  config.image_shape = (15, 15, 3)
  mazes.check_config(config)
  (tmp_path / 'folder' / 'test' / 'mazes' / '0.png').unlink()
  (tmp_path / 'folder' / 'test' / 'mazes' / '1.png').unlink()
  with pytest.raises(ValueError, match=r'no \.png mazes in .*test'):
    mazes.check_config(config)
  mazes.write_png(str(tmp_path / 'folder' / 'test' / 'mazes' / '0.png'), np.ones((15, 15, 3)))
  mazes.write_png(str(tmp_path / 'folder' / 'test' / 'mazes' / '1.png'), np.ones((11, 11, 3)))
  with pytest.raises(ValueError, match=r'1\.png: \(11, 11, 3\) pixels, unlike'):
    mazes.MazeFolder(str(tmp_path / 'folder'), 'test', 10)
