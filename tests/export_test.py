"""Export: the serialised forward pass equals model.apply, runs without the
training code, loads back as a model; bad arguments are one line."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

from conftest import one_error_line, write_artefact
from ctm_jax import artefact
from ctm_jax import evaluate
from ctm_jax import export
from ctm_jax import inference
from ctm_jax import storage
from ctm_jax import train
from ctm_jax.configs import image as image_configs
from ctm_jax.configs import mazes as maze_configs
from ctm_jax.configs import parity as parity_configs

CONFIGS = {
    'parity': lambda: parity_configs.get_config('smoke'),
    'image_classification': lambda: image_configs.get_config('smoke'),
    'mazes': lambda: maze_configs.get_config('smoke'),
}


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """task -> (model, variables, artefact dir) of a freshly initialised model, built on first use."""
  cache = {}

  def get(name):
    if name not in cache:
      out = tmp_path_factory.mktemp(name) / 'artefact'
      cache[name] = (*write_artefact(CONFIGS[name](), out), out)
    return cache[name]

  return get


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A parity smoke run (two steps) and its export through the command."""
  flags.FLAGS.mark_as_parsed()
  root = tmp_path_factory.mktemp('run')
  config = parity_configs.get_config('smoke')
  config.update(training_iterations=2, warmup_steps=1, save_every=2, track_every=1000)
  train.train_and_evaluate(config, str(root / 'run'))
  proc = subprocess.run(
      [sys.executable, '-m', 'ctm_jax.export', f'--workdir={root / "run"}', f'--out={root / "artefact"}'],
      capture_output=True, text=True, timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'its training checkpoint' in proc.stdout
  return root / 'run', root / 'artefact'


def _inputs(spec, batch, seed):
  rng = np.random.default_rng(seed)
  shape = spec['inputs']['shape'][1:]
  return rng.standard_normal((batch, *shape)).astype(spec['inputs']['dtype'])


@pytest.mark.parametrize(
    'name',
    # Parity in the default tier; the image and maze models (seconds of compile each) in slow.
    [n if n == 'parity' else pytest.param(n, marks=pytest.mark.slow) for n in CONFIGS],
)
def test_exported_program_equals_model_apply_at_any_batch_size(name, exported):
  model, variables, out = exported(name)
  program = artefact.load_program(str(out))
  assert program.spec['task'] == name
  apply = jax.jit(model.apply)
  for batch in (1, 3):
    inputs = _inputs(program.spec, batch, seed=batch)
    got = program(inputs)
    want = apply(variables, inputs)
    np.testing.assert_allclose(got['predictions'], want.predictions, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got['certainties'], want.certainties, rtol=1e-6, atol=1e-6)
  # The artefact also loads back as a flax model with its variables.
  model, variables, config = inference.load(str(out))
  assert config.task == name
  inputs = _inputs(program.spec, 2, seed=9)
  np.testing.assert_allclose(
      model.apply(variables, inputs).predictions, program(inputs)['predictions'], atol=1e-6
  )


@pytest.mark.slow  # over 10 s: the slow tier (CI runs it after the default suite)
def test_export_of_a_run_holds_its_trained_variables_and_is_smaller(trained):
  run, out = trained
  model, variables, _ = inference.load(str(run))
  program = artefact.load_program(str(out))
  assert program.spec['source'] == {'workdir': str(run), 'step': 2}  # the newest, resolved
  inputs = _inputs(program.spec, 3, seed=0)
  np.testing.assert_allclose(
      program(inputs)['predictions'], model.apply(variables, inputs).predictions, atol=1e-6
  )
  assert storage.size(str(out)) < 0.6 * export.checkpoint_bytes(str(run))


def test_program_runs_in_a_process_without_training_code(exported, tmp_path):
  _, _, out = exported('parity')
  spec = artefact.read_spec(str(out))
  inputs = _inputs(spec, 4, seed=0)
  np.save(tmp_path / 'inputs.npy', inputs)
  script = (
      'import sys, numpy as np\n'
      'from ctm_jax import artefact\n'
      f'program = artefact.load_program({str(out)!r})\n'
      f'out = program(np.load({str(tmp_path / "inputs.npy")!r}))\n'
      f'np.save({str(tmp_path / "predictions.npy")!r}, np.asarray(out["predictions"]))\n'
      'loaded = [m for m in sys.modules if m.startswith("ctm_jax.") and m.split(".")[1] in '
      '("train", "steps", "tasks", "data", "evaluators", "checkpoint", "inference")]\n'
      'assert not loaded, loaded\n'
  )
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_allclose(
      np.load(tmp_path / 'predictions.npy'), artefact.load_program(str(out))(inputs)['predictions'],
      atol=1e-6,
  )


@pytest.mark.slow  # over 10 s: the slow tier (CI runs it after the default suite)
def test_export_refuses_bad_arguments_in_one_line(trained, tmp_path):
  run, out = trained
  for argv, field in (
      ([f'--workdir={run}', f'--out={out}'], '--out='),
      ([f'--workdir={tmp_path / "none"}', f'--out={tmp_path / "a"}'], '--workdir='),
      ([f'--workdir={run}', f'--out={tmp_path / "b"}', '--input_shape=a,b'], '--input_shape='),
      ([f'--workdir={run}', f'--out={tmp_path / "c"}', '--step=999'], '--step=999'),
  ):
    proc = subprocess.run(
        [sys.executable, '-m', 'ctm_jax.export', *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert field in one_error_line(proc.stderr, 'ctm_jax.export:')
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'c').exists()
  assert artefact.is_artefact(str(out))  # the refused overwrite left it whole


@pytest.mark.slow  # over 10 s: the slow tier (CI runs it after the default suite)
def test_evaluate_command_reproduces_the_training_eval(trained, tmp_path):
  run, out = trained
  proc = subprocess.run(
      [sys.executable, '-m', 'ctm_jax.evaluate', f'--workdir={run}', f'--out={tmp_path / "eval"}'],
      capture_output=True, text=True, timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'eval/acc_most_certain' in proc.stdout
  with open(run / 'metrics.jsonl') as f:
    trained_eval = [r for r in map(json.loads, f) if 'eval/loss' in r][-1]
  evaluated = json.loads((tmp_path / 'eval' / 'metrics.json').read_text())
  assert evaluated['step'] == trained_eval['step'] == 2
  for key, value in trained_eval.items():
    if key not in ('step', 'eval/elapsed_s'):
      assert evaluated[key] == pytest.approx(value, abs=1e-6), key
  assert (tmp_path / 'eval' / 'plots' / 'eval_ticks_0000002.png').exists()
  # The exported artefact evaluates to the same numbers (its config is the run's).
  from_artefact = evaluate.evaluate(str(out), out=str(tmp_path / 'eval_artefact'))
  assert from_artefact['step'] == 2
  for key, value in trained_eval.items():
    if key not in ('step', 'eval/elapsed_s'):
      assert from_artefact[key] == pytest.approx(value, abs=1e-6), key
  assert (tmp_path / 'eval_artefact' / 'plots' / 'eval_ticks_0000002.png').exists()
  proc = subprocess.run(
      [sys.executable, '-m', 'ctm_jax.evaluate', f'--workdir={run}', '--step=7'],
      capture_output=True, text=True, timeout=300,
  )
  assert proc.returncode == 2 and '--step=7' in one_error_line(proc.stderr, 'ctm_jax.evaluate:')
