"""Tracking: where will a moving object be? (the community's tracking task)

A record shows one object, a single lit cell on a G x G grid (G = 16), in F
frames: at frame f it is at p0 + f v, where p0 is a uniformly random cell and
v a velocity drawn uniformly from the nonzero vectors with components in
[-S, S] (S = max_speed; S = 1: the 8 compass directions). Motion reflects off
the walls: a coordinate that would leave [0, G - 1] comes back by as much as
it overshot, and that velocity component changes sign. The answer is the
object's cell `horizon` steps after the last frame shown (time F - 1 +
horizon), which no frame shows: the model must infer the motion and run it
on. Variants: 'quadrant' (4 classes: 2 * (row >= G/2) + (col >= G/2)) and
'position' (G * G classes: row * G + col).

A record is a pure function of (split, seed, index), like every synthetic
source here.

Dimension glossary: F frames, G grid side.
"""

import numpy as np

TARGETS = ('quadrant', 'position')
_SPLIT_STREAMS = {'train': 0, 'eval': 1}
TRAIN_RECORDS = 2**31 - 1
EVAL_RECORDS = 10_000


def reflect(position: int, velocity: int, steps: int, grid: int) -> int:
  """One coordinate after `steps` steps on [0, grid - 1] with reflections: the
  motion unfolded onto a circle of length 2 (grid - 1), folded back."""
  period = 2 * (grid - 1)
  unfolded = (position + velocity * steps) % period
  return unfolded if unfolded <= grid - 1 else period - unfolded


def position_at(p0_2, v_2, time: int, grid: int) -> np.ndarray:
  """The (row, col) cell at `time` of an object starting at p0 with velocity v."""
  return np.array([reflect(int(p), int(v), time, grid) for p, v in zip(p0_2, v_2)], np.int32)


def velocities(max_speed: int) -> np.ndarray:
  """(V, 2): every nonzero velocity with components in [-max_speed, max_speed]."""
  span = np.arange(-max_speed, max_speed + 1)
  grid = np.stack(np.meshgrid(span, span, indexing='ij'), -1).reshape(-1, 2)
  return grid[np.any(grid != 0, axis=1)].astype(np.int32)


def answer_class(position_2, grid: int, target: str) -> int:
  row, col = int(position_2[0]), int(position_2[1])
  if target == 'quadrant':
    return 2 * (row >= grid // 2) + (col >= grid // 2)
  return row * grid + col


def num_classes(grid: int, target: str) -> int:
  return 4 if target == 'quadrant' else grid * grid


class TrackingSource:
  """Random-access tracking records: grain's `RandomAccessDataSource` protocol.

  Record `index` is {'inputs': float32 (F, G, G, 1) the frames, 'targets':
  int32 () the answer's class, 'position': int32 (2,) the answer's cell,
  'start': int32 (2,), 'velocity': int32 (2,)}.
  """

  def __init__(self, grid: int, frames: int, horizon: int, max_speed: int, target: str, seed: int,
               num_records: int, split: str = 'train'):
    check(grid, frames, horizon, max_speed, target)
    if split not in _SPLIT_STREAMS:
      raise ValueError(f'split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}')
    self.grid, self.frames, self.horizon, self.max_speed, self.target = grid, frames, horizon, max_speed, target
    self.seed, self.num_records, self.split = seed, num_records, split
    self._velocities = velocities(max_speed)

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f'record {index} out of range [0, {self.num_records})')
    rng = np.random.default_rng([_SPLIT_STREAMS[self.split], self.seed, index])
    start_2 = rng.integers(0, self.grid, 2).astype(np.int32)
    velocity_2 = self._velocities[rng.integers(len(self._velocities))]
    frames_FxGxGx1 = np.zeros((self.frames, self.grid, self.grid, 1), np.float32)
    for f in range(self.frames):
      row, col = position_at(start_2, velocity_2, f, self.grid)
      frames_FxGxGx1[f, row, col, 0] = 1.0
    answer_2 = position_at(start_2, velocity_2, self.frames - 1 + self.horizon, self.grid)
    return {
        'inputs': frames_FxGxGx1,
        'targets': np.int32(answer_class(answer_2, self.grid, self.target)),
        'position': answer_2,
        'start': start_2,
        'velocity': velocity_2.copy(),
    }

  def __repr__(self) -> str:
    return (f'TrackingSource(grid={self.grid}, frames={self.frames}, horizon={self.horizon}, '
            f'max_speed={self.max_speed}, target={self.target!r}, seed={self.seed}, '
            f'num_records={self.num_records}, split={self.split!r})')


def check(grid: int, frames: int, horizon: int, max_speed: int, target: str) -> None:
  """ValueError 'NAME=VALUE: why' for the first value out of range."""
  if target not in TARGETS:
    raise ValueError(f'target={target!r}: expected one of {", ".join(map(repr, TARGETS))}')
  for name, value, low in (('grid', grid, 4), ('frames', frames, 2), ('horizon', horizon, 1),
                           ('max_speed', max_speed, 1)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
      raise ValueError(f'{name}={value!r}: must be an integer >= {low}')
  if grid % 2:
    raise ValueError(f'grid={grid}: must be even (the quadrants split it in half)')
  if max_speed >= grid:
    raise ValueError(f'max_speed={max_speed}: must be below the grid side {grid}')


def train_source(config) -> TrackingSource:
  return TrackingSource(*settings(config), config.seed, TRAIN_RECORDS, 'train')


def eval_source(config, num_records: int = EVAL_RECORDS) -> TrackingSource:
  return TrackingSource(*settings(config), config.seed, num_records, 'eval')


def settings(config):
  return (config.tracking_grid, config.tracking_frames, config.tracking_horizon, config.tracking_max_speed,
          config.tracking_target)
