"""Generalisation to larger mazes by re-application.

A maze model predicts a route of R moves from the red start. On a maze bigger
than it was trained on, the route may stop short: walk the predicted route
(most-certain tick) as far as it stays on free pixels, move the start there and
run the model again, up to `max_reapplications` times, until the walk reaches
the goal. A move into a wall is skipped and counted as a mistake; more than
`fault_tolerance` mistakes end that walk (the reference's analysis allows 2).

Run on a trained (or imported) maze workdir:

  python -m ctm_jax.tools.mazes_generalisation --workdir=runs/mazes_small \\
      --sizes=11,21,31 --count=200 --max_reapplications=20

It prints a table per maze size (solve rate, mean re-applications, route
lengths) and the solve rate by route length (ranges doubling from the
model's route length) and writes `results.json` and route pictures (each application's walk
in its own colour) under `--out` (default `<workdir>/generalisation`).

Dimension glossary: B batch, H, W pixels, R route length, T ticks.
"""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import outputs
from ctm_jax import storage
from ctm_jax import validation
from ctm_jax.data import mazes
from ctm_jax.interop import hub

MOVES = 5  # up, down, left, right, wait


def make_predict(model, variables, expand_range: bool):
  """images float32 (B, H, W, 3) in [0, 1] -> routes int (B, R) at each maze's
  most-certain tick."""

  @jax.jit
  def predict(images_BxHxWx3):
    inputs = images_BxHxWx3 * 2 - 1 if expand_range else images_BxHxWx3
    output = model.apply(variables, inputs)
    batch, _, ticks = output.predictions.shape
    logits_BxRx5xT = output.predictions.reshape(batch, -1, MOVES, ticks)
    tick_B = jnp.argmax(output.certainties[:, 1], axis=-1)
    logits_BxRx5 = jnp.take_along_axis(logits_BxRx5xT, tick_B[:, None, None, None], axis=3)[..., 0]
    return jnp.argmax(logits_BxRx5, axis=-1)

  return lambda images: np.asarray(predict(jnp.asarray(images)))


def solve(predict, maze_list, max_reapplications: int, batch_size: int = 64, fault_tolerance: int = 2):
  """Re-applies the model to every maze of `maze_list` (batched). Returns, per
  maze, {'solved', 'applications', 'walks'}: `walks` is each application's
  visited pixels. A maze whose walk makes no progress stops early (the model is
  deterministic, so another application would repeat it)."""
  results = [{'solved': False, 'applications': 0, 'walks': []} for _ in maze_list]
  starts = [m.start for m in maze_list]
  active = list(range(len(maze_list)))
  for _ in range(max_reapplications):
    if not active:
      break
    still = []
    for first in range(0, len(active), batch_size):
      chunk = active[first : first + batch_size]
      images = np.stack([maze_list[i].picture(starts[i]) for i in chunk])
      if len(chunk) < batch_size:  # one compiled shape per maze size
        pad = np.repeat(images[:1], batch_size - len(chunk), axis=0)
        images = np.concatenate([images, pad])
      routes_BxR = predict(images)
      for row, i in enumerate(chunk):
        maze = maze_list[i]
        reached, visited = mazes.walk(maze.free_HxW, starts[i], maze.goal, routes_BxR[row], fault_tolerance)
        results[i]['applications'] += 1
        results[i]['walks'].append(visited)
        if reached:
          results[i]['solved'] = True
        elif visited[-1] != starts[i]:
          starts[i] = visited[-1]
          still.append(i)
    active = still
  return results


def length_buckets(route_length: int, longest: int) -> list[tuple[int, int]]:
  """Route-length ranges doubling from the model's own: [1, R], [R+1, 2R], [2R+1, 4R], ..."""
  buckets, low, high = [], 1, route_length
  while low <= max(longest, 1):
    buckets.append((low, high))
    low, high = high + 1, 2 * high
  return buckets


def summary(maze_list, results, route_length: int) -> dict:
  """Solve rate and mean applications; also per route-length range (`by_length`:
  'lo-hi' -> [mazes, solve rate]), as the reference plots success against length."""
  solved = [r['solved'] for r in results]
  applications = [r['applications'] for r in results if r['solved']]
  lengths = [m.length for m in maze_list]
  by_length = {}
  for low, high in length_buckets(route_length, max(lengths, default=0)):
    inside = [ok for ok, n in zip(solved, lengths) if low <= n <= high]
    if inside:
      by_length[f'{low}-{high}'] = [len(inside), float(np.mean(inside))]
  return {
      'mazes': len(results),
      'solve_rate': float(np.mean(solved)) if results else 0.0,
      'mean_applications_solved': float(np.mean(applications)) if applications else float('nan'),
      'mean_route_length': float(np.mean(lengths)) if lengths else 0.0,
      'max_route_length': int(max(lengths, default=0)),
      'by_length': by_length,
  }


def route_picture(maze: mazes.Maze, walks, path: str, scale: int = 8) -> str:
  """The maze with each application's walk in its own colour (start red, goal green)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  image_HxWx3 = maze.picture(maze.start)
  colours = matplotlib.colormaps['cool'](np.linspace(0, 1, max(len(walks), 2)))[:, :3]
  for k, visited in enumerate(walks):
    for p in visited[1:]:
      image_HxWx3[p] = colours[k]
  image_HxWx3[maze.start] = mazes.START
  image_HxWx3[maze.goal] = mazes.GOAL
  pixels = np.round(image_HxWx3 * 255).astype(np.uint8)
  pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='PNG')
  storage.write_bytes(path, buffer.getvalue())
  return path


def load_mazes(size: int, count: int, seed: int, data_dir: str = '') -> list[mazes.Maze]:
  """`count` held-out mazes: generated at `size` pixels, or the first of the
  test split of a reference-format folder or a Hub dataset (`data_dir`,
  e.g. hf://SakanaAI/mazes-extralarge)."""
  if data_dir:
    reader = mazes.HubMazes if hub.is_hub(data_dir) else mazes.MazeFolder
    folder = reader(data_dir, 'test', route_length=1)
    return [mazes.Maze.from_image(folder[i]['image']) for i in range(min(count, len(folder)))]
  # The held-out stream: a seed other than the run's gives mazes it never evaluated on.
  source = mazes.GeneratedMazes(size, 1, seed, count, 'test')
  return [mazes.Maze.from_image(source[i]['image']) for i in range(count)]


def format_table(rows) -> str:
  """Markdown: one row per maze size, then solve rate by route length."""
  lines = [
      '| maze (pixels) | mazes | mean / max route | solved | mean applications (solved) |',
      '|---|---|---|---|---|',
  ]
  for size, s in rows:
    lines.append(
        f"| {size} | {s['mazes']} | {s['mean_route_length']:.1f} / {s['max_route_length']} "
        f"| {100 * s['solve_rate']:.1f}% | {s['mean_applications_solved']:.2f} |"
    )
  ranges = sorted({r for _, s in rows for r in s['by_length']}, key=lambda r: int(r.split('-')[0]))
  lines += [
      '',
      '| maze (pixels) | ' + ' | '.join(f'route {r}' for r in ranges) + ' |',
      '|---|' + '---|' * len(ranges),
  ]
  for size, s in rows:
    cells = [
        f'{100 * s["by_length"][r][1]:.0f}% ({s["by_length"][r][0]})' if r in s['by_length'] else '-'
        for r in ranges
    ]
    lines.append(f'| {size} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def run(workdir, sizes, count, max_reapplications, out='', seed=1, data_dir='', pictures=4,
        fault_tolerance=2, batch_size=64, step=None, overwrite=False):
  """The table's rows [(size, summary)], with results.json and pictures under
  `out`: an earlier report there is replaced with `overwrite` (the run's own
  `generalisation` always), anything else never (ctm_jax/outputs.py)."""
  from ctm_jax import inference  # pylint: disable=g-import-not-at-top

  if hub.is_hub(workdir) and not out:
    raise validation.UsageError(f'--workdir={workdir}: a Hub model; give --out, the folder for the results')
  out, own = (out, False) if out else (storage.join(workdir, 'generalisation'), True)
  out = storage.resolve(out, '--out')
  outputs.claim(out, 'generalisation', overwrite or own)  # before loading: refused at once
  model, variables, config = inference.load(workdir, step)
  predict = make_predict(model, variables, mazes.expand_range_of(config))
  route_length = int(model.prediction_reshaper[0])
  rows, records = [], {}
  with outputs.building(out, 'generalisation', overwrite or own) as folder:
    storage.path(folder).mkdir(parents=True, exist_ok=True)
    for size in ([0] if data_dir else sizes):
      maze_list = load_mazes(size, count, seed, data_dir)
      size = size or maze_list[0].free_HxW.shape[0]
      results = solve(predict, maze_list, max_reapplications, batch_size, fault_tolerance)
      rows.append((size, summary(maze_list, results, route_length)))
      records[str(size)] = {
          **rows[-1][1],
          'solved': [r['solved'] for r in results],
          'applications': [r['applications'] for r in results],
          'route_length': [m.length for m in maze_list],
      }
      for i in range(min(pictures, len(maze_list))):
        route_picture(maze_list[i], results[i]['walks'], storage.join(folder, f'route_{size}_{i}.png'))
    storage.write_text(storage.join(folder, 'results.json'), json.dumps(  # last: marks the report complete
        {'workdir': workdir if hub.is_hub(workdir) else storage.resolve(workdir),
         'max_reapplications': max_reapplications, 'fault_tolerance': fault_tolerance, 'sizes': records},
        indent=1))
  return rows


def _parse_sizes(text: str) -> list[int]:
  try:
    sizes = [int(s) for s in text.split(',') if s.strip()]
  except ValueError:
    sizes = []
  if not sizes or any(not mazes.MIN_SIZE <= s <= mazes.MAX_SIZE or s % 2 == 0 for s in sizes):
    raise validation.UsageError(
        f'--sizes={text!r}: a comma-separated list of odd maze sizes in pixels in '
        f'[{mazes.MIN_SIZE}, {mazes.MAX_SIZE}], e.g. 11,21,31'
    )
  return sizes


def _run(values):
  sizes = _parse_sizes(values.sizes)
  for name in ('count', 'max_reapplications', 'batch_size'):
    if values[name].value < 1:
      raise validation.UsageError(f'--{name}={values[name].value}: must be at least 1')
  rows = run(
      values.workdir, sizes, values.count, values.max_reapplications, values.out, values.seed,
      values.data_dir, values.pictures, values.fault_tolerance, values.batch_size, values.step,
      values.overwrite,
  )
  print(format_table(rows))


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string(
      'workdir', None, 'A trained or imported maze workdir, or a Hub model (hf://SakanaAI/ctm-maze-large).',
      required=True,
  )
  flags.DEFINE_string('sizes', '11,21,31', 'Maze sizes in pixels (odd), comma-separated.')
  flags.DEFINE_integer('count', 200, 'Mazes per size.')
  flags.DEFINE_integer('max_reapplications', 20, 'Model applications per maze at most.')
  flags.DEFINE_integer('fault_tolerance', 2, 'Moves into walls a walk may skip.')
  flags.DEFINE_string('data_dir', '', 'A reference-format maze folder, or a Hub dataset (hf://SakanaAI/mazes-extralarge), to test on instead.')
  flags.DEFINE_string('out', '', 'Output directory (default <workdir>/generalisation).')
  flags.DEFINE_bool('overwrite', False, 'Replace a report already at --out.')
  flags.DEFINE_integer('seed', 1, 'Generator seed of the test mazes.')
  flags.DEFINE_integer('pictures', 4, 'Route pictures per size.')
  flags.DEFINE_integer('batch_size', 64, 'Mazes per model call.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
  app.run(validation.command('mazes_generalisation', _run))
