"""Tracking: answers against a brute-force simulation, the frames, balance and
determinism of the generator, the task's checks and inputs, and the smoke
configs training, evaluating and resuming bit-identically on the (2, 2, 2)
mesh."""

import collections
import json
import shutil

import chex
from absl import flags
import numpy as np
import pytest

from conftest import needs_8_devices
from ctm_jax import tasks
from ctm_jax import train
from ctm_jax import validation
from ctm_jax.configs import tracking as tracking_configs
from ctm_jax.data import tracking as data


def simulate(start, velocity, time, grid):
  """Cell by cell: a step that would leave the grid turns back instead."""
  position, velocity = list(start), list(velocity)
  for _ in range(time):
    for axis in range(2):
      for _ in range(abs(velocity[axis])):
        step = 1 if velocity[axis] > 0 else -1
        if not 0 <= position[axis] + step <= grid - 1:
          velocity[axis], step = -velocity[axis], -step
        position[axis] += step
  return position


def test_answers_and_frames_match_a_brute_force_simulation():
  for target, speed in (('quadrant', 1), ('position', 1), ('position', 3)):
    source = data.TrackingSource(16, 4, 5, speed, target, 0, 2000)
    for i in range(2000):
      r = source[i]
      start, velocity = r['start'], r['velocity']
      for f in range(4):  # each frame lights exactly the simulated cell
        assert r['inputs'][f, ..., 0].sum() == 1
        assert r['inputs'][f, ..., 0][tuple(simulate(start, velocity, f, 16))] == 1
      row, col = simulate(start, velocity, 3 + 5, 16)
      assert list(r['position']) == [row, col]
      assert int(r['targets']) == (2 * (row >= 8) + (col >= 8) if target == 'quadrant' else row * 16 + col)


def test_velocities_and_classes_are_spread():
  source = data.TrackingSource(16, 4, 4, 1, 'quadrant', 0, 4000)
  records = [source[i] for i in range(4000)]
  velocities = collections.Counter(tuple(r['velocity']) for r in records)
  assert len(velocities) == 8 and (0, 0) not in velocities
  assert min(velocities.values()) > 400
  quadrants = collections.Counter(int(r['targets']) for r in records)
  assert sorted(quadrants) == [0, 1, 2, 3] and min(quadrants.values()) > 900
  cells = {tuple(r['position']) for r in records}
  assert len(cells) > 240  # nearly every one of the 256 cells is an answer


def test_the_answer_is_not_on_any_frame_shown():
  # The answer is `horizon` steps on: the last frame is not it, except where a
  # bounce brings the object back (2 cells from a wall, moving at it: ~4%).
  source = data.TrackingSource(16, 4, 4, 1, 'position', 0, 2000)
  last = [tuple(np.argwhere(source[i]['inputs'][-1, ..., 0])[0]) == tuple(source[i]['position']) for i in range(2000)]
  assert np.mean(last) < 0.06


def test_a_record_is_a_function_of_split_seed_and_index():
  a = data.TrackingSource(16, 4, 4, 1, 'position', 5, 100)
  b = data.TrackingSource(16, 4, 4, 1, 'position', 5, 100)
  for i in (0, 7, 99):
    chex.assert_trees_all_equal(a[i], b[i])
  starts = lambda s: [tuple(s[i]['start']) + tuple(s[i]['velocity']) for i in range(100)]  # noqa: E731
  assert starts(a) != starts(data.TrackingSource(16, 4, 4, 1, 'position', 6, 100))
  assert starts(a) != starts(data.TrackingSource(16, 4, 4, 1, 'position', 5, 100, 'eval'))


@pytest.mark.parametrize('override,named', [
    (dict(tracking_grid=15), 'config.tracking_grid=15: must be even'),
    (dict(tracking_frames=1), 'config.tracking_frames=1: must be an integer >= 2'),
    (dict(tracking_target='velocity'), "config.tracking_target='velocity': expected one of"),
    (dict(tracking_max_speed=9), 'config.tracking_max_speed=9: must be below the grid side 8'),
    (dict(n_tracking_gifs=-2), 'config.n_tracking_gifs=-2'),
])
def test_bad_settings_are_one_line_naming_the_field(override, named):
  config = tracking_configs.get_config('quadrant_smoke')
  config.update(override)
  with pytest.raises(ValueError) as raised:
    validation.validate(config)
  assert str(raised.value).startswith(named) and '\n' not in str(raised.value)


def test_too_few_ticks_for_the_frames_is_refused():
  config = tracking_configs.get_config('quadrant_smoke')
  config.model.ticks_per_frame = 3
  with pytest.raises(ValueError, match=r'config\.model\.iterations=6: 3 frames x config\.model\.ticks_per_frame=3'):
    validation.validate(config)


def test_predict_reads_the_motion_as_text():
  config = tracking_configs.get_config('position')
  task = tasks.get('object_tracking')
  batch = task.read_input(config, '2 14 1 1')
  assert batch['inputs'].shape == (1, 4, 16, 16, 1)
  row, col = simulate((2, 14), (1, 1), 3 + 4, 16)
  assert int(batch['targets'][0]) == row * 16 + col
  with pytest.raises(ValueError, match='velocity be nonzero'):
    task.read_input(config, '2 14 0 0')
  with pytest.raises(ValueError, match="expected 'ROW COL VROW VCOL'"):
    task.read_input(config, 'left')
  assert task.describe(config, np.eye(256)[17] * 5).startswith('cell (row 1, col 1)')


@pytest.mark.slow  # two short training runs on 8 devices each
@needs_8_devices
@pytest.mark.parametrize('variant', ['quadrant_smoke', 'position_smoke', 'lstm_quadrant_smoke'])
def test_smoke_trains_evaluates_and_resumes_bit_identically_on_the_mesh(variant, tmp_path):
  flags.FLAGS.mark_as_parsed()
  config = tracking_configs.get_config(variant)
  total = config.training_iterations
  config.mesh.data, config.mesh.fsdp, config.mesh.neuron = 2, 2, 2
  workdir = tmp_path / 'run'
  uninterrupted = train.train_and_evaluate(config, str(workdir))
  with open(workdir / 'metrics.jsonl') as f:
    evals = [r for r in map(json.loads, f) if 'eval/loss' in r]
  assert [r['step'] for r in evals] == [total // 2, total]
  assert (workdir / 'plots' / f'tracking_{total:07d}_0.gif').exists()
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(resumed_dir / 'checkpoints' / str(total))  # back to the middle
  resumed = train.train_and_evaluate(config, str(resumed_dir))
  assert int(resumed.step) == total
  chex.assert_trees_all_equal(resumed, uninterrupted)
