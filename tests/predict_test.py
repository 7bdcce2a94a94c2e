"""predict: one input file per task read as the task's data reads it, each
tick's answer and certainty equal to model.apply's, the early-exit tick, the
gif, and one line for a bad input."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import one_error_line, write_artefact
from ctm_jax import predict
from ctm_jax import tasks
from ctm_jax.configs import digits as digits_configs
from ctm_jax.configs import mazes as maze_configs
from ctm_jax.configs import parity as parity_configs
from ctm_jax.configs import qamnist as qamnist_configs
from ctm_jax.data import digits as digits_data
from ctm_jax.data import mazes as maze_data
from ctm_jax.data import parity as parity_data
from ctm_jax.tasks import parity as parity_task
from early_exit_test import _model
from serving_test import _thresholds_between

CONFIGS = {
    'parity': lambda: parity_configs.get_config('smoke'),
    'digits': lambda: digits_configs.get_config('smoke'),
    'mazes': lambda: maze_configs.get_config('smoke'),
    'qamnist': lambda: qamnist_configs.get_config('smoke'),
}


@pytest.fixture(scope='module')
def artefacts(tmp_path_factory):
  """name -> (model, variables, artefact dir) of an initialised model, built on first use."""
  cache = {}

  def get(name):
    if name not in cache:
      config = CONFIGS[name]()
      out = tmp_path_factory.mktemp(name) / 'artefact'
      given = None
      if name == 'parity':  # scaled up: certainties that differ across examples and ticks
        given = _model(config, 10.0, 10.0)[:2]
      cache[name] = (*write_artefact(config, out, seed=1, model_and_variables=given), out)
    return cache[name]

  return get


def _check_rows(model, variables, config, batch, rows, summary, threshold):
  task = tasks.get(config.task)
  output = jax.jit(model.apply)(variables, batch['inputs'])
  certainty_T = np.asarray(output.certainties[0, 1])
  assert [r[0] for r in rows] == list(range(1, model.iterations + 1))
  np.testing.assert_allclose([r[1] for r in rows], certainty_T, atol=1e-6)
  for t, row in enumerate(rows):
    assert row[2] == task.describe(config, np.asarray(output.predictions[0, :, t]))
  np.testing.assert_allclose([r[3] for r in rows], np.asarray(task.correct(output, batch))[0])
  assert summary['most_certain'] == int(np.argmax(certainty_T)) + 1
  sure_T = certainty_T >= threshold
  assert summary['exit_tick'] == (int(np.argmax(sure_T)) + 1 if sure_T.any() else len(rows))


def _gif_frames(path) -> int:
  with Image.open(path) as gif:
    return gif.n_frames


def test_parity_bits_give_the_models_ticks_and_a_gif(artefacts, tmp_path):
  model, variables, out = artefacts('parity')
  config = parity_configs.get_config('smoke')
  length = config.parity_sequence_length
  bits = ''.join(np.random.default_rng(0).choice(['0', '1'], length))
  inputs_L = np.where(np.array(list(bits)) == '1', -1.0, 1.0).astype(np.float32)
  (tmp_path / 'seq.txt').write_text(bits + '\n')
  batch = {'inputs': inputs_L[None], 'targets': parity_data.parity_targets(inputs_L[None])}
  rows, summary = predict.predict(str(out), bits, threshold=0.3, gif=str(tmp_path / 'p.gif'))
  _check_rows(model, variables, config, batch, rows, summary, 0.3)
  assert _gif_frames(tmp_path / 'p.gif') == model.iterations
  # A file of the bits reads the same; more ticks than trained run on.
  file_rows, _ = predict.predict(str(out), str(tmp_path / 'seq.txt'), max_ticks=2 * model.iterations)
  assert len(file_rows) == 2 * model.iterations
  np.testing.assert_allclose([r[1] for r in file_rows[: len(rows)]], [r[1] for r in rows], atol=1e-5)


def test_parity_sequences_parse_in_every_written_form():
  want = np.array([1, -1, -1, 1], np.float32)
  for text in ('0110', '0 1 1 0', '+--+', '1 -1 -1 1', '1,-1,-1,+1\n'):
    np.testing.assert_array_equal(parity_task.parse_sequence(text, 'x'), want)
  for bad in ('', '012', 'abc', '1 2 3'):
    with pytest.raises(ValueError, match='--input=x'):
      parity_task.parse_sequence(bad, 'x')


@pytest.mark.slow  # compiles the digits and maze models
def test_pictures_read_as_the_datasets_read_them(artefacts, tmp_path):
  # Digits: an 8x8 test digit, drawn 8x larger as a user's PNG, reads back as the record.
  model, variables, out = artefacts('digits')
  config = digits_configs.get_config('smoke')
  images_NxHxW, labels_N, _, test = digits_data._load()  # pylint: disable=protected-access
  pixels = np.round(images_NxHxW[test[0]] * 255).astype(np.uint8)
  Image.fromarray(pixels).resize((64, 64), Image.NEAREST).save(tmp_path / 'digit.png')
  batch = tasks.get('image_classification').read_input(config, str(tmp_path / 'digit.png'))
  want = digits_data.Digits('eval')[0]['inputs']
  np.testing.assert_allclose(batch['inputs'][0], want, atol=0.5 / 255 / 0.3)  # uint8 rounding
  rows, summary = predict.predict(str(out), str(tmp_path / 'digit.png'), gif=str(tmp_path / 'd.gif'))
  assert rows[0][3] is None  # a picture carries no label
  assert _gif_frames(tmp_path / 'd.gif') == model.iterations
  del labels_N, summary
  # Mazes: a generated maze's PNG, its shortest route as the targets.
  model, variables, out = artefacts('mazes')
  config = maze_configs.get_config('smoke')
  size = config.image_shape[0]
  image_HxWx3, path = maze_data.make_maze(size, np.random.default_rng(3))
  maze_data.write_png(str(tmp_path / 'maze.png'), image_HxWx3)
  batch = tasks.get('mazes').read_input(config, str(tmp_path / 'maze.png'))
  np.testing.assert_array_equal(
      batch['targets'][0],
      maze_data.pad_route(maze_data.directions(path), config.maze_route_length),
  )
  np.testing.assert_array_equal(
      batch['inputs'][0], maze_data.model_input(image_HxWx3, config.expand_range)
  )
  rows, summary = predict.predict(
      str(out), str(tmp_path / 'maze.png'), threshold=0.5, gif=str(tmp_path / 'm.gif')
  )
  _check_rows(model, variables, config, batch, rows, summary, 0.5)
  assert _gif_frames(tmp_path / 'm.gif') == model.iterations


def test_command_prints_ticks_and_refuses_bad_input_in_one_line(artefacts, tmp_path):
  model, _, out = artefacts('parity')
  length = parity_configs.get_config('smoke').parity_sequence_length
  proc = subprocess.run(
      [sys.executable, '-m', 'ctm_jax.predict', f'--workdir={out}', '--input=' + '01' * (length // 2),
       '--threshold=0.5'],
      capture_output=True, text=True, timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = [line for line in proc.stdout.splitlines() if line[:4].strip().isdigit()]
  assert len(table) == model.iterations and '<- most certain' in proc.stdout
  proc = subprocess.run(
      [sys.executable, '-m', 'ctm_jax.predict', f'--workdir={out}', '--input=0110'],
      capture_output=True, text=True, timeout=300,
  )
  assert proc.returncode == 2 and '--input=0110' in one_error_line(proc.stderr, 'ctm_jax.predict:')
  for kwargs, field in (
      (dict(source=str(tmp_path / 'missing.npy')), 'missing.npy'),
      (dict(source='0' * length, max_ticks=0), '--max_ticks=0'),
      (dict(source='0' * length, threshold=-1.0), '--threshold=-1'),
  ):
    with pytest.raises(ValueError, match=field):
      predict.predict(str(out), **kwargs)


def test_a_folder_is_served_with_early_exit(artefacts, tmp_path):
  model, variables, out = artefacts('parity')
  config = parity_configs.get_config('smoke')
  length = config.parity_sequence_length
  rng = np.random.default_rng(4)
  folder = tmp_path / 'queue'
  folder.mkdir()
  inputs = []
  for i in range(7):
    bits = ''.join(rng.choice(['0', '1'], length))
    (folder / f'{i}.txt').write_text(bits)
    inputs.append(parity_task.parse_sequence(bits, 'x'))
  inputs = np.stack(inputs)
  full = jax.jit(model.apply)(variables, inputs)
  certainty_NxT = np.asarray(full.certainties[:, 1])
  (threshold,) = _thresholds_between(certainty_NxT, rng, 1)
  threshold = float(threshold)
  rows, summary = predict.serve_folder(str(out), str(folder), threshold=threshold, slots=3)
  want = jax.jit(lambda x: model.apply(variables, x, exit_threshold=np.float32(threshold)))(inputs)
  assert [r[0] for r in rows] == [f'{i}.txt' for i in range(7)]
  assert [r[2] for r in rows] == np.asarray(want.ticks).tolist()
  task = tasks.get('parity')
  assert [r[1] for r in rows] == [task.describe(config, np.asarray(p)) for p in want.predictions]
  assert summary['examples'] == 7 and 0 <= summary['accuracy'] <= 1
  assert summary['mean_ticks'] == pytest.approx(np.mean(want.ticks))
  (folder / 'odd.txt').write_text('0' * (length + 2))
  with pytest.raises(ValueError, match='odd.txt'):
    predict.serve_folder(str(out), str(folder), threshold=threshold)


@pytest.mark.slow  # compiles the Q&A-MNIST model
def test_a_question_about_digit_pictures_reads_as_the_dataset_and_draws(artefacts, tmp_path):
  from ctm_jax.data import qamnist as qa_data  # pylint: disable=g-import-not-at-top

  model, variables, out = artefacts('qamnist')
  config = qamnist_configs.get_config('smoke')
  source = qa_data.SmallDigitImages('eval')
  images, _, _, test_rows = digits_data._load()  # pylint: disable=protected-access
  paths = []
  for k, row in enumerate(test_rows[:2]):  # the eval split's first two digits, as 8x8 PNGs
    path = tmp_path / f'digit{k}.png'
    Image.fromarray(np.round(images[row] * 255).astype(np.uint8)).save(path)
    paths.append(str(path))
  question = f'{paths[0]} {paths[1]} ? d1 - d0 + d1 = 4'
  batch = tasks.get('qamnist').read_input(config, question)
  inputs = batch['inputs']
  np.testing.assert_array_equal(inputs['digits'][0], np.stack([source.get(0)[0], source.get(1)[0]]))
  assert inputs['question'][0].tolist() == [1, -2, 0, -1, 1] and batch['targets'].tolist() == [4]
  rows, summary = predict.predict(str(out), question, gif=str(tmp_path / 'q.gif'))
  output = jax.jit(model.apply)(variables, inputs)
  ticks = 2 + 5 + model.iterations_for_answering
  assert [r[0] for r in rows] == list(range(1, ticks + 1))
  np.testing.assert_allclose([r[1] for r in rows], np.asarray(output.certainties[0, 1]), atol=1e-6)
  right = (np.asarray(output.predictions[0]).argmax(0) == 4).astype(float)
  np.testing.assert_array_equal([r[3] for r in rows], right)
  assert Image.open(summary['gif']).n_frames == ticks
  with pytest.raises(ValueError, match="'x' where an operator"):
    tasks.get('qamnist').read_input(config, f'{paths[0]} ? d0 x d0')
  with pytest.raises(ValueError, match=r'do not alternate digit indices'):
    tasks.get('qamnist').read_input(config, f'{paths[0]} ? d3 + d0')


@pytest.mark.slow  # exports the Q&A-MNIST model
def test_a_folder_of_questions_is_refused_in_one_line(artefacts, tmp_path):
  """The server needs inputs fixed over the ticks; Q&A-MNIST's change."""
  _, _, out = artefacts('qamnist')
  folder = tmp_path / 'questions'
  folder.mkdir()
  np.savez(folder / 'q.npz', digits=np.zeros((1, 28, 28, 1), np.float32), question=np.zeros(1, np.int32))
  with pytest.raises(Exception, match=r"task 'qamnist' reads several per example"):
    predict.serve_folder(str(out), str(folder), threshold=0.9)
