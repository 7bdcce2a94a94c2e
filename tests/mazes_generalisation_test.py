"""Generalisation by re-application: the walk, the loop, the table, the command."""

import subprocess
import sys

import numpy as np
import pytest

from ctm_jax.data import mazes
from ctm_jax.tools import mazes_generalisation as gen

from conftest import one_error_line


def _oracle(route_length, maze_list_by_shape):
  """A 'model' that knows every maze: the first `route_length` moves of the
  shortest route from the picture's red pixel, padded with wait."""

  def predict(images_BxHxWx3):
    routes = []
    for image_HxWx3 in images_BxHxWx3:
      maze = mazes.Maze.from_image(image_HxWx3)
      path = mazes.shortest_path(maze.free_HxW, maze.start, maze.goal)
      routes.append(mazes.pad_route(mazes.directions(path), route_length))
    return np.stack(routes)

  del maze_list_by_shape
  return predict


def test_length_buckets_double_from_the_route_length():
  assert gen.length_buckets(20, 150) == [(1, 20), (21, 40), (41, 80), (81, 160)]
  assert gen.length_buckets(20, 5) == [(1, 20)]


def test_walk_skips_walls_up_to_the_fault_tolerance_and_stops_at_the_goal():
  maze = gen.load_mazes(11, 1, seed=3)[0]
  path = mazes.shortest_path(maze.free_HxW, maze.start, maze.goal)
  route = mazes.directions(path)
  reached, visited = mazes.walk(maze.free_HxW, maze.start, maze.goal, route + [mazes.WAIT] * 3)
  assert reached and visited == path
  # A move into a wall (or off the picture) is skipped and counted.
  y, x = maze.start
  blocked = next(
      m for m, (dy, dx) in enumerate(mazes.MOVE_DELTAS)
      if not (0 <= y + dy < 11 and 0 <= x + dx < 11 and maze.free_HxW[y + dy, x + dx])
  )
  reached, visited = mazes.walk(maze.free_HxW, maze.start, maze.goal, [blocked] * 2 + route, 2)
  assert reached and visited == path
  reached, visited = mazes.walk(maze.free_HxW, maze.start, maze.goal, [blocked] * 3 + route, 2)
  assert not reached and visited == [maze.start]


@pytest.mark.parametrize('route_length', [6, 20])
def test_reapplication_follows_short_routes_to_the_goal_of_bigger_mazes(route_length):
  maze_list = gen.load_mazes(21, 24, seed=5)
  results = gen.solve(_oracle(route_length, None), maze_list, max_reapplications=50, batch_size=8)
  assert all(r['solved'] for r in results)
  for maze, r in zip(maze_list, results):
    # Each application walks `route_length` moves of the shortest route.
    assert r['applications'] == max(1, -(-maze.length // route_length))
    walked = [p for w in r['walks'] for p in w[1:]]
    assert walked == mazes.shortest_path(maze.free_HxW, maze.start, maze.goal)[1:]
  table = gen.summary(maze_list, results, route_length)
  assert table['solve_rate'] == 1.0 and table['mazes'] == 24
  assert sum(n for n, _ in table['by_length'].values()) == 24
  assert all(rate == 1.0 for _, rate in table['by_length'].values())
  # Too few applications: the longer routes are not solved.
  capped = gen.solve(_oracle(route_length, None), maze_list, max_reapplications=1)
  expected = [m.length <= route_length for m in maze_list]
  assert [r['solved'] for r in capped] == expected
  # By length: routes within the model's length solved, every longer one not.
  by_length = gen.summary(maze_list, capped, route_length)['by_length']
  assert by_length[f'1-{route_length}'][1] == 1.0
  assert all(rate == 0.0 for r, (_, rate) in by_length.items() if r != f'1-{route_length}')
  table = gen.format_table([(21, gen.summary(maze_list, capped, route_length))])
  assert f'| route 1-{route_length} |' in table and '| 21 | 24 |' in table


def test_a_model_that_does_not_move_stops_after_one_application():
  maze_list = gen.load_mazes(15, 4, seed=0)
  still = lambda images: np.full((len(images), 10), mazes.WAIT)
  results = gen.solve(still, maze_list, max_reapplications=20)
  assert [r['applications'] for r in results] == [1] * 4
  assert not any(r['solved'] for r in results)
  assert np.isnan(gen.summary(maze_list, results, 10)['mean_applications_solved'])


def test_route_picture_colours_each_application(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  maze = gen.load_mazes(21, 1, seed=2)[0]
  result = gen.solve(_oracle(8, None), [maze], max_reapplications=50)[0]
  path = gen.route_picture(maze, result['walks'], str(tmp_path / 'route.png'), scale=2)
  with Image.open(path) as image:
    pixels = np.asarray(image.convert('RGB'))[::2, ::2] / 255
  assert np.allclose(pixels[maze.start], mazes.START) and np.allclose(pixels[maze.goal], mazes.GOAL)
  on_route = {tuple(np.round(pixels[p], 2)) for w in result['walks'] for p in w[1:-1]}
  on_route -= {mazes.START, mazes.GOAL}
  assert len(on_route) >= min(result['applications'], 2)


def test_command_refuses_bad_sizes_and_a_workdir_without_a_run(tmp_path):
  for argv, field in (
      ([f'--workdir={tmp_path}', '--sizes=12'], '--sizes='),
      ([f'--workdir={tmp_path}', '--sizes=11'], '--workdir='),
  ):
    proc = subprocess.run(
        [sys.executable, '-m', 'ctm_jax.tools.mazes_generalisation', *argv],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert field in one_error_line(proc.stderr, 'mazes_generalisation:')
  assert not (tmp_path / 'generalisation').exists()


def test_input_range_of_trained_and_imported_models():
  import ml_collections  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict
  assert mazes.expand_range_of(config({'expand_range': True})) is True
  assert mazes.expand_range_of(config({'expand_range': False})) is False
  assert mazes.expand_range_of(config({'reference_args': {'expand_range': True}})) is True
  # Released reference checkpoints predate the flag and read [0, 1].
  assert mazes.expand_range_of(config({'reference_args': {'dataset': 'mazes-large'}})) is False
