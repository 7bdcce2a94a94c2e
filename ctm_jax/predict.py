"""Run a trained CTM on one input and watch it think, tick by tick; or serve a folder.

  python -m ctm_jax.predict --workdir=RUN --input=FILE [--step=N]
      [--threshold=0.9] [--max_ticks=T] [--gif=OUT.gif]
  python -m ctm_jax.predict --workdir=RUN --input=DIR --threshold=0.9 [--slots=64]

RUN is a training run, an exported artefact or an imported reference model.
FILE is what the run's task reads (`Predicts.read_input`): a picture for image
classification, a maze PNG, a parity sequence (a file, or the bits themselves:
--input=0110...), or a `.npy` of one model-ready example for any task. Prints
each tick's answer and certainty (and whether it is right, when the input
determines the answer), the most certain tick, and with --threshold the tick
where early exit stops. --gif writes the attention animation.

With a folder as --input, every file in it is read the same way and served
with early exit (`ctm_jax.serving.Server`: --slots examples tick together, a
finished one's slot refilled at once): one line per file (answer, ticks used,
certainty, how right when the input determines it) and the throughput.
"""

import os
import time

import jax
import numpy as np

from ctm_jax import compiling
from ctm_jax import inference
from ctm_jax import serving
from ctm_jax import storage
from ctm_jax import tasks
from ctm_jax import validation


def _load(workdir, step, threshold, max_ticks):
  if max_ticks is not None and max_ticks < 1:
    raise validation.UsageError(f'--max_ticks={max_ticks}: must be a positive integer')
  if threshold is not None and not 0 < threshold:
    raise validation.UsageError(f'--threshold={threshold}: a certainty in (0, 1]')
  model, variables, config = inference.load(workdir, step)
  task = tasks.get(config.task)
  if not isinstance(task, tasks.Predicts):
    raise validation.UsageError(
        f'--workdir={workdir}: task {task.name!r} reads no single inputs (it has no tasks.Predicts part); '
        'evaluate it with python -m ctm_jax.evaluate'
    )
  if max_ticks is not None:
    model = model.clone(iterations=max_ticks)
  return model, variables, config, task


def read_input(task, config, source: str) -> dict:
  """The task's batch of one from `source`: a regular file of bounded size
  (or text), holding finite numbers; ValueError naming it otherwise."""
  tasks.check_input_file(source)
  batch = task.read_input(config, source)
  tasks.check_finite(batch, source)
  return batch


def predict(workdir: str, source: str, step=None, threshold=None, max_ticks=None, gif=''):
  """Rows (tick, certainty, answer, right or None) and a summary dict."""
  model, variables, config, task = _load(workdir, step, threshold, max_ticks)
  batch = read_input(task, config, source)
  try:
    output = compiling.jit(model.apply)(variables, batch['inputs'])
  except (TypeError, ValueError) as e:
    raise validation.UsageError(f'--input={source}: the model cannot read it ({e})') from None
  predictions_OxT = np.asarray(output.predictions[0])
  certainty_T = np.asarray(output.certainties[0, 1])
  right_T = None
  if 'targets' in batch:
    right_T = np.asarray(task.correct(output, batch))[0]
  rows = [
      (t + 1, float(certainty_T[t]), task.describe(config, predictions_OxT[:, t]),
       None if right_T is None else float(right_T[t]))
      for t in range(len(certainty_T))
  ]
  summary = {'task': config.task, 'ticks': len(rows), 'most_certain': int(np.argmax(certainty_T)) + 1}
  if threshold is not None:
    sure_T = certainty_T >= threshold
    summary['exit_tick'] = int(np.argmax(sure_T)) + 1 if sure_T.any() else len(rows)
    summary['exit_sure'] = bool(sure_T.any())
  if gif:
    storage.path(storage.resolve(gif, '--gif')).parent.mkdir(parents=True, exist_ok=True)
    summary['gif'] = task.prediction_gif(config, model, variables, batch, gif)
  return rows, summary


def serve_folder(workdir: str, directory: str, step=None, threshold=None, max_ticks=None, slots=64):
  """Rows (file, answer, ticks, certainty, right or None) of every file in
  `directory`, served with early exit at `threshold` (None: every tick), and
  a summary dict (examples/s of the compiled server, measured on a second run)."""
  model, variables, config, task = _load(workdir, step, threshold, max_ticks)
  names = sorted(n for n in os.listdir(directory) if not n.startswith('.'))
  paths = [os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))]
  if not paths:
    raise validation.UsageError(f'--input={directory}: no files in the folder')
  batches = [read_input(task, config, path) for path in paths]
  if not isinstance(batches[0]['inputs'], np.ndarray):
    raise validation.UsageError(
        f'--input={directory}: the server ticks inputs fixed over the ticks; task {config.task!r} reads '
        'several per example (inputs over the ticks): predict its files one at a time'
    )
  shape = batches[0]['inputs'].shape
  for path, batch in zip(paths, batches):
    if batch['inputs'].shape != shape:
      raise validation.UsageError(
          f'--input={path}: reads as {batch["inputs"].shape[1:]}, the folder\'s first file as '
          f'{shape[1:]}; serve inputs of one size'
      )
  inputs = np.concatenate([b['inputs'] for b in batches])
  server = serving.Server(model, slots=min(slots, len(paths)))
  threshold = np.float32(2.0 if threshold is None else threshold)  # > 1: never sure, every tick
  try:
    result = jax.block_until_ready(server(variables, inputs, threshold))  # compiles
  except (TypeError, ValueError) as e:
    raise validation.UsageError(f'--input={directory}: the model cannot read its files ({e})') from None
  started = time.perf_counter()
  jax.block_until_ready(server(variables, inputs, threshold))
  seconds = time.perf_counter() - started
  predictions_NxO = np.asarray(result.predictions)
  right_N = [None] * len(paths)
  if all('targets' in b for b in batches):
    targets = {'targets': np.concatenate([b['targets'] for b in batches])}
    right_N = np.asarray(task.correct(result.as_output(), targets))[:, 0].tolist()
  rows = [
      (os.path.basename(path), task.describe(config, predictions_NxO[i]), int(result.ticks[i]),
       float(result.certainties[i, 1]), right_N[i])
      for i, path in enumerate(paths)
  ]
  summary = {
      'task': config.task,
      'examples': len(rows),
      'mean_ticks': float(np.mean(result.ticks)),
      'max_ticks': server.max_ticks,
      'examples_per_s': len(rows) / seconds,
  }
  if right_N[0] is not None:
    summary['accuracy'] = float(np.mean(right_N))
  return rows, summary


def format_served(rows, summary) -> str:
  scored = rows[0][4] is not None
  width = max(len(r[0]) for r in rows)
  lines = [f'{"file":{width}s}  ticks  certainty  ' + ('right  ' if scored else '') + 'answer']
  for name, answer, ticks, certainty, right in rows:
    score = f'{100 * right:5.1f}% ' if scored else ''
    lines.append(f'{name:{width}s}  {ticks:5d}  {certainty:9.3f}  {score}{answer}')
  lines.append(
      f'{summary["examples"]} inputs, {summary["mean_ticks"]:.2f} ticks on average of '
      f'{summary["max_ticks"]}, {summary["examples_per_s"]:.0f} inputs/s served'
      + (f', {100 * summary["accuracy"]:.1f}% right' if 'accuracy' in summary else '')
  )
  return '\n'.join(lines)


def format_rows(rows, summary) -> str:
  scored = rows[0][3] is not None
  lines = ['tick  certainty  ' + ('right  ' if scored else '') + 'answer']
  for tick, certainty, answer, right in rows:
    mark = ''
    if tick == summary['most_certain']:
      mark += '  <- most certain'
    if tick == summary.get('exit_tick'):
      mark += '  <- early exit' + ('' if summary['exit_sure'] else ' (never sure: last tick)')
    score = f'{100 * right:5.1f}% ' if scored else ''
    lines.append(f'{tick:4d}  {certainty:9.3f}  {score}{answer}{mark}')
  return '\n'.join(lines)


def _shown(workdir: str) -> str:
  return workdir if storage.is_url(workdir) else os.path.abspath(workdir)


def _run(values):
  if not values.input:
    raise validation.UsageError('--input is empty: give a file (or, for a task that reads text, the text itself)')
  if os.path.isdir(values.input):
    if values.gif:
      raise validation.UsageError(f'--gif={values.gif}: one input at a time; give --input a file')
    if values.slots < 1:
      raise validation.UsageError(f'--slots={values.slots}: must be a positive integer')
    rows, summary = serve_folder(
        values.workdir, values.input, values.step, values.threshold, values.max_ticks, values.slots
    )
    print(f'{summary["task"]}: {_shown(values.workdir)} on {values.input}')
    print(format_served(rows, summary))
    return
  rows, summary = predict(
      values.workdir, values.input, values.step, values.threshold, values.max_ticks, values.gif
  )
  print(f'{summary["task"]}: {_shown(values.workdir)} on {values.input}, {summary["ticks"]} ticks')
  print(format_rows(rows, summary))
  if 'gif' in summary:
    print(f'attention gif: {summary["gif"]}')


def run():
  """`ctm-predict`, the same as `python -m ctm_jax.predict`; flags are defined here, so
  importing this module adds none."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string('workdir', None, 'A training run, an exported artefact or an import.', required=True)
  flags.DEFINE_string('input', None, 'The input file (or, for a task that reads text, the text itself), or a folder to serve.', required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step of a training run (default: the newest).')
  flags.DEFINE_float('threshold', None, 'Mark the tick where early exit at this certainty stops.')
  flags.DEFINE_integer('max_ticks', None, 'Ticks to run (default: as trained; more allowed).')
  flags.DEFINE_string('gif', '', 'Write the attention animation here.')
  flags.DEFINE_integer('slots', 64, 'A folder as --input: examples ticking at once.')
  app.run(validation.command('ctm_jax.predict', _run))


if __name__ == '__main__':
  run()
