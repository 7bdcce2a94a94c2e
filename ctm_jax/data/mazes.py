"""Mazes: a seeded generator of perfect mazes, the reference's PNG format, routes.

A maze of S x S pixels (S odd) is a grid of (S-1)/2 x (S-1)/2 cells: cell
(i, j) sits at pixel (2i+1, 2j+1) and the pixel between two cells is free when
they are joined. Pixels are RGB in [0, 1]: walls black, free white, start red
(1,0,0), goal green (0,1,0), the solution path between them blue (0,0,1). That
is the reference's dataset format (`<root>/{train,test}/<class>/*.png`, from
the maze-dataset library's randomised depth-first search, `gen_dfs`).

A route is the direction of each one-pixel step from start to goal (up 0,
down 1, left 2, right 3), cut or padded with wait (4) to `route_length`: the
reference's `MazeImageFolder.get_solution`. Model inputs are the picture with
the path whitened, scaled to [-1, 1].

Generated records are pure functions of (split, seed, index), like parity's,
so any host or worker builds any record and a resumed run sees the same data.

Run `python -m ctm_jax.data.mazes --out=DIR --size=39 --train=N --test=M
--seed=S` to write a generated dataset in the reference's folder layout.

Dimension glossary: H, W pixels; R route length.
"""

import dataclasses
import functools
import io
import json
import os

import numpy as np

from ctm_jax import outputs
from ctm_jax import storage
from ctm_jax.data import hub_datasets
from ctm_jax.interop import hub

UP, DOWN, LEFT, RIGHT, WAIT = 0, 1, 2, 3, 4
# (dy, dx) of each move, in the reference's order of preference.
MOVE_DELTAS = ((-1, 0), (1, 0), (0, -1), (0, 1))

WALL = (0.0, 0.0, 0.0)
FREE = (1.0, 1.0, 1.0)
START = (1.0, 0.0, 0.0)
GOAL = (0.0, 1.0, 0.0)
PATH = (0.0, 0.0, 1.0)

_SPLIT_STREAMS = {'train': 0, 'test': 1, 'fresh': 2}  # fresh: the server page's new mazes
TRAIN_RECORDS = 2**31 - 1  # unbounded for all practical purposes; fits grain's shuffle
TEST_RECORDS = 1000


def _cells(size: int) -> int:
  if size < 3 or size % 2 == 0:
    raise ValueError(f'maze size {size}: must be odd and at least 3 (a grid of (size-1)/2 cells)')
  return (size - 1) // 2


def generate(size: int, rng: np.random.Generator) -> np.ndarray:
  """A perfect maze (one route between any two cells) by randomised depth-first
  search from a random cell. Returns the free-pixel mask, bool (size, size)."""
  n = _cells(size)
  free_HxW = np.zeros((size, size), bool)
  visited = np.zeros((n, n), bool)
  start = (int(rng.integers(n)), int(rng.integers(n)))
  visited[start] = True
  free_HxW[2 * start[0] + 1, 2 * start[1] + 1] = True
  stack = [start]
  while stack:
    i, j = stack[-1]
    options = [
        (i + di, j + dj)
        for di, dj in MOVE_DELTAS
        if 0 <= i + di < n and 0 <= j + dj < n and not visited[i + di, j + dj]
    ]
    if not options:
      stack.pop()
      continue
    ni, nj = options[int(rng.integers(len(options)))]
    visited[ni, nj] = True
    free_HxW[i + ni + 1, j + nj + 1] = True  # the pixel between the two cells
    free_HxW[2 * ni + 1, 2 * nj + 1] = True
    stack.append((ni, nj))
  return free_HxW


def shortest_path(free_HxW: np.ndarray, start, goal) -> list[tuple[int, int]]:
  """Pixels from start to goal inclusive (breadth-first search); [] if unreachable."""
  h, w = free_HxW.shape
  previous = {tuple(start): None}
  frontier = [tuple(start)]
  while frontier and tuple(goal) not in previous:
    nxt = []
    for y, x in frontier:
      for dy, dx in MOVE_DELTAS:
        p = (y + dy, x + dx)
        if 0 <= p[0] < h and 0 <= p[1] < w and free_HxW[p] and p not in previous:
          previous[p] = (y, x)
          nxt.append(p)
    frontier = nxt
  if tuple(goal) not in previous:
    return []
  path = [tuple(goal)]
  while previous[path[-1]] is not None:
    path.append(previous[path[-1]])
  return path[::-1]


def render(free_HxW: np.ndarray, path) -> np.ndarray:
  """The reference's picture: float32 (H, W, 3) in [0, 1]."""
  image_HxWx3 = np.where(free_HxW[..., None], np.float32(1), np.float32(0)).repeat(3, -1)
  image_HxWx3 = image_HxWx3.astype(np.float32)
  for p in path[1:-1]:
    image_HxWx3[p] = PATH
  image_HxWx3[path[0]] = START
  image_HxWx3[path[-1]] = GOAL
  return image_HxWx3


def directions(path) -> list[int]:
  """The moves between consecutive pixels of a path."""
  out = []
  for (y0, x0), (y1, x1) in zip(path[:-1], path[1:]):
    out.append(MOVE_DELTAS.index((y1 - y0, x1 - x0)))
  return out


def pad_route(moves, route_length: int) -> np.ndarray:
  route_R = np.full(route_length, WAIT, np.int32)
  moves = list(moves)[:route_length]
  route_R[: len(moves)] = moves
  return route_R


def _is(image_HxWx3, colour):
  return np.all(image_HxWx3 == np.asarray(colour, image_HxWx3.dtype), axis=-1)


def _one_start_and_goal(start, goal) -> None:
  if len(start) != 1 or len(goal) != 1:
    raise ValueError(
        f'{len(start)} start (red) and {len(goal)} goal (green) pixels in the maze picture; '
        'a maze has exactly one of each'
    )


def route_from_image(image_HxWx3: np.ndarray, route_length: int) -> np.ndarray:
  """The route a reference-format picture draws, as the reference reads it: from
  red, step to the first blue or green neighbour (up, down, left, right) until
  green, `route_length` steps at most."""
  start, goal = np.argwhere(_is(image_HxWx3, START)), np.argwhere(_is(image_HxWx3, GOAL))
  _one_start_and_goal(start, goal)
  on_path_HxW = _is(image_HxWx3, PATH) | _is(image_HxWx3, GOAL)
  h, w = on_path_HxW.shape
  y, x = start[0]
  goal = tuple(goal[0])
  moves = []
  while (y, x) != goal and len(moves) < route_length:
    on_path_HxW[y, x] = False  # never step back
    for move, (dy, dx) in enumerate(MOVE_DELTAS):
      if 0 <= y + dy < h and 0 <= x + dx < w and on_path_HxW[y + dy, x + dx]:
        moves.append(move)
        y, x = y + dy, x + dx
        break
    else:
      raise ValueError(f'the blue path breaks off at pixel {(int(y), int(x))}')
  return pad_route(moves, route_length)


# Move relabelling under the picture's transforms (np.rot90 on axes (0, 1)).
_ROT_CCW = (LEFT, RIGHT, DOWN, UP, WAIT)  # k=+1: up becomes left, ...
_ROT_CW = (RIGHT, LEFT, UP, DOWN, WAIT)  # k=-1
_FLIP_LR = (UP, DOWN, RIGHT, LEFT, WAIT)
_FLIP_UD = (DOWN, UP, LEFT, RIGHT, WAIT)


def augment(image_HxWx3, route_R, rng: np.random.Generator, p: float):
  """The reference's train augmentation: with probability p each, a +-90 degree
  rotation, a left-right flip and an up-down flip, the route relabelled."""
  image_HxWx3, route_R = np.asarray(image_HxWx3), np.asarray(route_R)
  if rng.random() < p:
    k = 1 if rng.random() < 0.5 else -1
    image_HxWx3 = np.rot90(image_HxWx3, k=k, axes=(0, 1))
    route_R = np.take(_ROT_CCW if k == 1 else _ROT_CW, route_R)
  if rng.random() < p:
    image_HxWx3, route_R = np.fliplr(image_HxWx3), np.take(_FLIP_LR, route_R)
  if rng.random() < p:
    image_HxWx3, route_R = np.flipud(image_HxWx3), np.take(_FLIP_UD, route_R)
  return np.ascontiguousarray(image_HxWx3), route_R.astype(np.int32)


def model_input(image_HxWx3: np.ndarray, expand_range: bool = True) -> np.ndarray:
  """The path whitened (the model must find it), then [0, 1] -> [-1, 1] when
  `expand_range` (the reference's flag; its train_ctm.sh turns it off)."""
  image_HxWx3 = np.array(image_HxWx3, np.float32, copy=True)
  image_HxWx3[_is(image_HxWx3, PATH)] = FREE
  return image_HxWx3 * 2 - 1 if expand_range else image_HxWx3


def expand_range_of(config) -> bool:
  """Whether the model reads [-1, 1] inputs: a training config's flag, or an
  imported reference model's argument. Reference checkpoints saved before that
  argument existed were trained on [0, 1] (its analysis script's
  `--legacy_scaling`, on by default), so a missing one means off."""
  if 'expand_range' in config:
    return bool(config.expand_range)
  args = config.get('reference_args') or {}
  return bool(args.get('expand_range', False))


def make_maze(size: int, rng: np.random.Generator):
  """(picture float32 (H, W, 3), path pixels) with start and goal two distinct random cells."""
  free_HxW = generate(size, rng)
  n = _cells(size)
  first, second = rng.choice(n * n, size=2, replace=False)
  start = (2 * (first // n) + 1, 2 * (first % n) + 1)
  goal = (2 * (second // n) + 1, 2 * (second % n) + 1)
  path = shortest_path(free_HxW, start, goal)
  return render(free_HxW, path), path


class GeneratedMazes:
  """Random-access generated maze records: grain's `RandomAccessDataSource`.

  Record `index` is {'image': float32 (H, W, 3) reference-format picture in
  [0, 1], 'route': int32 (R,)}, from a generator seeded by (split, seed, index).
  """

  def __init__(self, size: int, route_length: int, seed: int, num_records: int, split='train'):
    _cells(size)
    if split not in _SPLIT_STREAMS:
      raise ValueError(f'split {split!r}: expected one of {sorted(_SPLIT_STREAMS)}')
    self.size, self.route_length, self.seed = size, route_length, seed
    self.num_records, self.split = num_records, split

  def __len__(self):
    return self.num_records

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f'record {index} out of range [0, {self.num_records})')
    rng = np.random.default_rng([_SPLIT_STREAMS[self.split], self.seed, index])
    image_HxWx3, path = make_maze(self.size, rng)
    return {'image': image_HxWx3, 'route': pad_route(directions(path), self.route_length)}

  def __repr__(self):
    return (
        f'GeneratedMazes(size={self.size}, route_length={self.route_length}, seed={self.seed}, '
        f'num_records={self.num_records}, split={self.split!r})'
    )


def read_png(path: str) -> np.ndarray:
  """A reference-format maze PNG as float32 (H, W, 3) in [0, 1]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(path) as image:
    return np.asarray(image.convert('RGB'), np.float32) / 255


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


def decode_png(data: bytes) -> np.ndarray:
  """read_png of a PNG's bytes (a maze read from a bucket)."""
  return read_png(io.BytesIO(data))


def write_png(path: str, image_HxWx3: np.ndarray):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  Image.fromarray(np.round(np.asarray(image_HxWx3) * 255).astype(np.uint8)).save(path)


def _png_paths(directory: str) -> list[str]:
  """<directory>/<class>/*.png, sorted as torchvision's ImageFolder lists them
  (on disk or in a bucket: one listing)."""
  prefix = directory.rstrip('/') + '/'
  return [
      path
      for path in storage.files_under(directory)
      if path.lower().endswith('.png') and path[len(prefix):].count('/') == 1
  ]


def _has_folder(directory: str) -> bool:
  if storage.is_bucket(directory):
    return bool(storage.files_under(directory))
  return os.path.isdir(directory)


def _png_shape(path: str) -> tuple[int, int, int]:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  source = io.BytesIO(storage.read_many([path])[0]) if storage.is_bucket(path) else path
  with Image.open(source) as image:  # reads the header only
    return (image.height, image.width, 3)


class MazeFolder:
  """The reference's maze folders (`<root>/<split>/<class>/*.png`), read into memory.

  Record `index` is {'image', 'route'} as GeneratedMazes gives them; files in
  sorted order, as torchvision's ImageFolder lists them.
  """

  def __init__(self, root: str, split: str, route_length: int):
    directory = storage.join(root, split)
    if not _has_folder(directory):
      raise FileNotFoundError(f'{directory}: no such maze folder (expected <root>/{split}/<class>/*.png)')
    paths = _png_paths(directory)
    if not paths:
      raise FileNotFoundError(f'{directory}: no .png mazes in its class folders')
    # A bad file is the user's to fix: a UsageError (one line from every command).
    from ctm_jax import validation  # pylint: disable=g-import-not-at-top  # validation imports the tasks

    self.images = []
    for path, data in zip(paths, storage.read_many(paths)):
      try:
        self.images.append(decode_png(data))
      except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise validation.UsageError(
            f'{path}: not a maze picture PIL can read ({_first_line(e)}); remove or replace it'
        ) from None
    for path, image in zip(paths, self.images):
      if image.shape != self.images[0].shape:
        raise validation.UsageError(
            f'{path}: {image.shape} pixels, unlike {paths[0]} ({self.images[0].shape}); a folder holds one size'
        )
    self.routes = []
    for path, image in zip(paths, self.images):
      try:
        self.routes.append(route_from_image(image, route_length))
      except ValueError as e:
        raise validation.UsageError(f'{path}: {e}; remove or replace it') from None
    self.paths = paths

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return {'image': self.images[int(index)], 'route': self.routes[int(index)]}


class HubMazes:
  """A maze dataset on the Hugging Face Hub (`hf://SakanaAI/mazes-large`,
  -small, -medium, -extralarge: parquet rows of the maze picture as a PNG,
  `image`, and its `solution_path`), read into memory as MazeFolder reads the
  same mazes as PNG folders: the same records, routes read off the picture.

  huggingface_hub + pyarrow rather than `datasets`: the rows are plain parquet,
  read whole into memory here, and the cache, login and offline mode are
  huggingface_hub's either way; `datasets` would add its own copy and
  arrow cache of each split for nothing this pipeline uses.
  """

  def __init__(self, source: str, split: str, route_length: int):
    paths = hub_datasets.split_files(source, split)
    self.images = hub_datasets.parquet_images(paths)
    if not self.images:
      raise ValueError(f'{source}: its {split} split holds no mazes')
    for i, image in enumerate(self.images):
      if image.shape != self.images[0].shape:
        raise ValueError(f'{source}: {split} maze {i} is {image.shape}, unlike maze 0 ({self.images[0].shape})')
    self.routes = [route_from_image(image, route_length) for image in self.images]

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return {'image': self.images[int(index)], 'route': self.routes[int(index)]}


class ModelRecords:
  """A maze source's records as the model reads them: {'inputs': float32
  (H, W, 3), path whitened, in [-1, 1] (or [0, 1] without expand_range);
  'targets': int32 (R,) route}."""

  def __init__(self, source, expand_range: bool = True):
    self.source, self.expand_range = source, expand_range

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    record = self.source[index]
    return {
        'inputs': model_input(record['image'], self.expand_range),
        'targets': record['route'],
    }

  def __repr__(self):
    return f'ModelRecords({self.source!r}, expand_range={self.expand_range})'


def _augment_record(record, rng, p):
  inputs, targets = augment(record['inputs'], record['targets'], rng, p)
  return {'inputs': inputs, 'targets': targets}


# --- The task's data, from its config (ctm_jax/tasks/mazes.py) ----------------------


def check_config(config):
  """ValueError naming the field when the maze data cannot be what the config says."""
  height, width, channels = config.image_shape
  if height != width or channels != 3 or height % 2 == 0 or height < 3:
    raise ValueError(
        f'config.image_shape={tuple(config.image_shape)!r}: mazes are square, odd-sized RGB, '
        'e.g. (39, 39, 3)'
    )
  if not isinstance(config.expand_range, bool):
    raise ValueError(f'config.expand_range={config.expand_range!r}: True or False')
  if not 0 <= config.augment_p <= 1:
    raise ValueError(f'config.augment_p={config.augment_p!r}: a probability in [0, 1]')
  if hub.is_hub(config.data_dir):
    for split in ('train', 'test'):
      try:
        (first,) = hub_datasets.parquet_images(hub_datasets.split_files(config.data_dir, split)[:1], limit=1)
      except ValueError as e:
        raise ValueError(f'config.data_dir={config.data_dir!r}: {e}') from None
      if first.shape != tuple(config.image_shape):
        raise ValueError(
            f'config.image_shape={tuple(config.image_shape)!r}: the mazes in {config.data_dir} are '
            f'{first.shape!r}; pass --config.image_shape="{first.shape!r}"'
        )
  elif config.data_dir:
    if storage.is_url(config.data_dir):
      storage.resolve(config.data_dir, 'config.data_dir')  # gs:// set up, another scheme refused
    for split in ('train', 'test'):
      directory = storage.join(config.data_dir, split)
      if not _has_folder(directory):
        raise ValueError(
            f'config.data_dir={config.data_dir!r}: no {split}/ folder of maze PNGs there '
            '(the reference layout <root>/{train,test}/<class>/*.png); unset it to generate mazes'
        )
      first = next(iter(_png_paths(directory)), None)
      if first is None:
        raise ValueError(f'config.data_dir={config.data_dir!r}: no .png mazes in {directory}/<class>/')
      shape = _png_shape(first)
      if shape != tuple(config.image_shape):
        raise ValueError(
            f'config.image_shape={tuple(config.image_shape)!r}: the mazes in {config.data_dir} are '
            f'{shape!r} ({first}); pass --config.image_shape="{shape!r}"'
        )


def _source(config, split: str, num_records: int):
  check_config(config)
  if hub.is_hub(config.data_dir):
    mazes = HubMazes(config.data_dir, split, config.maze_route_length)
  elif config.data_dir:
    mazes = MazeFolder(config.data_dir, split, config.maze_route_length)
  else:
    size = config.image_shape[0]
    mazes = GeneratedMazes(size, config.maze_route_length, config.seed, num_records, split)
  return ModelRecords(mazes, config.expand_range)


def train_source(config):
  return _source(config, 'train', TRAIN_RECORDS)


def eval_source(config):
  return _source(config, 'test', TEST_RECORDS)


def train_transform(config):
  """The reference's random rotations and flips, each with probability augment_p."""
  if not config.augment_p:
    return None
  return functools.partial(_augment_record, p=float(config.augment_p))


# The generator's bounds: two distinct cells (start, goal) need size 5; past
# 1001 pixels a maze is ~12 MB of float32 and takes minutes to draw.
MIN_SIZE, MAX_SIZE = 5, 1001
MAX_MAZES = 10_000_000
DATASET_FILE = 'mazes.json'  # written last: the folder is a complete generated dataset


def check_dataset_args(size: int, train: int, test: int, flag_prefix: str = '--') -> None:
  """ValueError naming the flag when the generator cannot make this dataset."""
  if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE or size % 2 == 0:
    raise ValueError(
        f'{flag_prefix}size={size}: an odd number of pixels in [{MIN_SIZE}, {MAX_SIZE}] '
        '(a grid of (size-1)/2 cells; the reference trains on 39)'
    )
  for name, count in (('train', train), ('test', test)):
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_MAZES:
      raise ValueError(f'{flag_prefix}{name}={count}: a number of mazes in [0, {MAX_MAZES}]')
  if train + test == 0:
    raise ValueError(f'{flag_prefix}train=0 and {flag_prefix}test=0: nothing to write; ask for some mazes')


def write_dataset(out: str, size: int, train: int, test: int, seed: int, route_length: int = 100,
                  overwrite: bool = False):
  """Generated mazes as reference-format PNGs: out/{train,test}/mazes/<index>.png,
  and out/mazes.json (size, seed, counts) last. Refuses (ValueError naming
  the flag) an `out` that holds anything but a generated dataset, and that
  one without `overwrite` (ctm_jax/outputs.py): two seeds never mix."""
  check_dataset_args(size, train, test)
  out = os.path.abspath(out)
  with outputs.building(out, 'mazes', overwrite) as tmp:
    for split, count in (('train', train), ('test', test)):
      directory = os.path.join(tmp, split, 'mazes')
      os.makedirs(directory, exist_ok=True)
      source = GeneratedMazes(size, route_length, seed, max(count, 1), split)
      width = len(str(max(count - 1, 0)))
      for index in range(count):
        write_png(os.path.join(directory, f'{index:0{width}d}.png'), source[index]['image'])
    with open(os.path.join(tmp, DATASET_FILE), 'w') as f:
      json.dump({'size': size, 'seed': seed, 'train': train, 'test': test}, f, indent=1)


def _main(argv):
  import sys  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    print(f'error: unexpected arguments: {argv[1:]}', file=sys.stderr)
    sys.exit(2)
  values = flags.FLAGS
  try:
    write_dataset(values.out, values.size, values.train, values.test, values.seed, overwrite=values.overwrite)
  except ValueError as e:  # a flag or --out the user can fix
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except OSError as e:
    print(f'error: --out={values.out}: {e.strerror or e}', file=sys.stderr)
    sys.exit(2)
  print(f'wrote {values.train} train and {values.test} test mazes of {values.size}x{values.size} '
        f'pixels under {os.path.abspath(values.out)}')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string('out', None, 'Dataset root to write.', required=True)
  flags.DEFINE_integer('size', 39, 'Maze size in pixels, odd: a grid of (size-1)/2 cells.')
  flags.DEFINE_integer('train', 1000, 'Train mazes.')
  flags.DEFINE_integer('test', 100, 'Test mazes.')
  flags.DEFINE_integer('seed', 0, 'Generator seed.')
  flags.DEFINE_bool('overwrite', False, 'Replace a dataset this generator wrote at --out.')
  app.run(_main)


@dataclasses.dataclass
class Maze:
  """A maze picture as the generalisation tool and `predict` read it."""

  free_HxW: np.ndarray  # bool
  start: tuple[int, int]
  goal: tuple[int, int]
  length: int  # moves of the shortest route

  @classmethod
  def from_image(cls, image_HxWx3):
    """From a reference-format picture (the blue path, if any, is ignored)."""
    image_HxWx3 = np.asarray(image_HxWx3, np.float32)
    start = np.argwhere(np.all(image_HxWx3 == START, axis=-1))
    goal = np.argwhere(np.all(image_HxWx3 == GOAL, axis=-1))
    _one_start_and_goal(start, goal)
    free_HxW = ~np.all(image_HxWx3 == 0, axis=-1)
    start, goal = tuple(int(v) for v in start[0]), tuple(int(v) for v in goal[0])
    length = len(shortest_path(free_HxW, start, goal)) - 1
    return cls(free_HxW, start, goal, length)

  def picture(self, start) -> np.ndarray:
    """The model's view with the start at `start`: float32 (H, W, 3) in [0, 1]."""
    image_HxWx3 = np.where(self.free_HxW[..., None], np.float32(1), np.float32(0)).repeat(3, -1)
    image_HxWx3[start] = START
    image_HxWx3[self.goal] = GOAL
    return image_HxWx3


def walk(free_HxW, start, goal, route_R, fault_tolerance: int = 2):
  """Follows `route_R` from `start`. Returns (reached the goal, pixels visited
  from `start` on). Wait moves stay put; a move off the picture or into a wall
  is skipped as a mistake, and the walk ends after `fault_tolerance` of them."""
  height, width = free_HxW.shape
  y, x = start
  visited = [(y, x)]
  mistakes = 0
  for move in np.asarray(route_R).tolist():
    if move >= len(MOVE_DELTAS):
      continue
    dy, dx = MOVE_DELTAS[move]
    if not (0 <= y + dy < height and 0 <= x + dx < width and free_HxW[y + dy, x + dx]):
      mistakes += 1
      if mistakes > fault_tolerance:
        break
      continue
    y, x = y + dy, x + dx
    visited.append((y, x))
    if (y, x) == tuple(goal):
      return True, visited
  return False, visited
