"""Run a trained CTM on one input and watch it think, tick by tick.

  python -m ctm_jax.predict --workdir=RUN --input=FILE [--step=N]
      [--threshold=0.9] [--max_ticks=T] [--gif=OUT.gif]

RUN is a training run, an exported artefact or an imported reference model.
FILE is what the run's task reads (`Task.read_input`): a picture for image
classification, a maze PNG, a parity sequence (a file, or the bits themselves:
--input=0110...), or a `.npy` of one model-ready example for any task. Prints
each tick's answer and certainty (and whether it is right, when the input
determines the answer), the most certain tick, and with --threshold the tick
where early exit stops. --gif writes the attention animation.
"""

import os
import sys

import jax
import numpy as np

from ctm_jax import inference
from ctm_jax import tasks
from ctm_jax import validation


def predict(workdir: str, source: str, step=None, threshold=None, max_ticks=None, gif=''):
  """Rows (tick, certainty, answer, right or None) and a summary dict."""
  model, variables, config = inference.load(workdir, step)
  task = tasks.get(config.task)
  batch = task.read_input(config, source)
  if max_ticks is not None:
    if max_ticks < 1:
      raise validation.UsageError(f'--max_ticks={max_ticks}: must be a positive integer')
    model = model.clone(iterations=max_ticks)
  if threshold is not None and not 0 < threshold:
    raise validation.UsageError(f'--threshold={threshold}: a certainty in (0, 1]')
  try:
    output = jax.jit(model.apply)(variables, batch['inputs'])
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
    os.makedirs(os.path.dirname(os.path.abspath(gif)), exist_ok=True)
    summary['gif'] = task.prediction_gif(config, model, variables, batch, gif)
  return rows, summary


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


def _main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  values = flags.FLAGS
  try:
    if not values.input:
      raise validation.UsageError('--input is empty: give a file (or, for parity, the bits)')
    rows, summary = predict(
        values.workdir, values.input, values.step, values.threshold, values.max_ticks, values.gif
    )
  except (validation.UsageError, ValueError, OSError) as e:
    print(f'ctm_jax.predict: {validation.first_line(e)}', file=sys.stderr)
    sys.exit(2)
  print(f'{summary["task"]}: {os.path.abspath(values.workdir)} on {values.input}, {summary["ticks"]} ticks')
  print(format_rows(rows, summary))
  if 'gif' in summary:
    print(f'attention gif: {summary["gif"]}')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string('workdir', None, 'A training run, an exported artefact or an import.', required=True)
  flags.DEFINE_string('input', None, 'The input file (parity: or the bits).', required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step of a training run (default: the newest).')
  flags.DEFINE_float('threshold', None, 'Mark the tick where early exit at this certainty stops.')
  flags.DEFINE_integer('max_ticks', None, 'Ticks to run (default: as trained; more allowed).')
  flags.DEFINE_string('gif', '', 'Write the attention animation here.')
  app.run(_main)
