"""`config.init_from=RUN`, and `init_from_parts='core'`: another task's CTM core
(synapses, NLMs, start states, synch decays and pairs) with this task's own
input side and output head, initialised afresh."""

import json

import flax
import jax
import numpy as np
import pytest

from ctm_jax import checkpoint as checkpoint_lib
from ctm_jax import inference
from ctm_jax import sharding
from ctm_jax import steps
from ctm_jax import train
from ctm_jax import validation
from ctm_jax.configs import parity
from ctm_jax.models import ctm as ctm_lib


@pytest.fixture(scope='module')
def source_run(tmp_path_factory):
  """A parity smoke run (length 8), trained a few steps: its weights differ from any init."""
  workdir = tmp_path_factory.mktemp('source') / 'run'
  config = parity.get_config('smoke')
  config.training_iterations, config.save_every, config.track_every = 10, 10, 10
  train.train_and_evaluate(config, str(workdir))
  return workdir


def _target(source, parts, length=6, seed=7):
  config = parity.get_config('smoke')  # the same core; another sequence length: another head
  config.parity_sequence_length = length
  config.seed = seed
  config.init_from = str(source)
  config.init_from_parts = parts
  return config


def _initial(config, tmp_path):
  task = validation.validate(config)
  model = task.make_model(config)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / 'run'), keep=1)
  mesh = sharding.make_mesh(config.mesh)
  try:
    with jax.set_mesh(mesh):
      program = task.training(config, model).program(mesh, str(tmp_path / 'plots'), 0.0)
      state, how = train._initial_state(config, program, checkpointer, same_model=True)
      fresh = program.init()
  finally:
    checkpointer.close()
  return state, fresh, how


def _flat(state):
  return flax.traverse_util.flatten_dict(jax.device_get(steps.variables(state, state.params)), sep='/')


def test_core_comes_from_the_source_run_and_every_other_leaf_is_a_fresh_init(source_run, tmp_path):
  state, fresh, how = _initial(_target(source_run, 'core'), tmp_path)
  assert how == f'initialised from {source_run} (its CTM core)'
  _, source, _ = inference.load(str(source_run))
  source = flax.traverse_util.flatten_dict(jax.device_get(source), sep='/')
  got, init = _flat(state), _flat(fresh)
  assert set(got) == set(init)
  core = sorted(name for name in got if ctm_lib.is_core(name))
  # Synapses, NLMs, start states, both decays and all four pair index vectors.
  assert {n.split('/')[1] for n in core} >= {'tick', 'start_activated_state', 'start_trace',
                                             'decay_params_out', 'decay_params_action'}
  assert any('synapses' in n for n in core) and any('trace_processor' in n for n in core)
  assert sum(n.startswith('synch/') for n in core) == 4
  for name in got:
    want = source[name] if name in core else init[name]
    np.testing.assert_array_equal(got[name], want, err_msg=name)
    if name in core and not name.startswith('synch/'):  # trained: the copy is not an init by chance
      assert not np.array_equal(got[name], init[name]), name
  # The head (another out_dims) and the input side are this config's own.
  assert got['params/tick/output_projector_0/kernel'].shape[-1] == 12
  assert int(state.step) == 0


def test_all_from_a_run_takes_every_weight(source_run, tmp_path):
  state, _, how = _initial(_target(source_run, 'all', length=8), tmp_path)
  assert how == f'initialised from {source_run}'
  _, source, _ = inference.load(str(source_run))
  source = flax.traverse_util.flatten_dict(jax.device_get(source), sep='/')
  got = _flat(state)
  assert set(got) == set(source)
  for name in got:
    np.testing.assert_array_equal(got[name], source[name], err_msg=name)


def test_a_core_of_other_shapes_is_refused_in_one_line(source_run, tmp_path):
  config = _target(source_run, 'core')
  config.model.d_model = 48
  with pytest.raises(ValueError) as raised:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  line = str(raised.value)
  assert line.startswith(f'config.init_from={str(source_run)!r}: ') and '\n' not in line
  assert 'd_model (source 32, configured 48)' in line
  assert not (tmp_path / 'run').exists()


def test_all_from_a_run_of_another_model_is_refused(source_run, tmp_path):
  with pytest.raises(ValueError, match=r'config\.init_from=.* differs from config\.model in out_dims'):
    validation.validate(_target(source_run, 'all'))


@pytest.mark.parametrize('parts,init_from,named', [
    ('head', 'RUN', "config.init_from_parts='head': expected one of 'all', 'core'"),
    ('core', '', "config.init_from_parts='core': names parts of config.init_from, which is empty"),
])
def test_init_from_parts_is_checked(source_run, parts, init_from, named):
  config = _target(source_run if init_from else '', parts)
  with pytest.raises(ValueError, match=named.replace('(', r'\(').replace(')', r'\)')):
    validation.validate(config)


def test_a_run_without_a_checkpoint_is_refused(tmp_path):
  empty = tmp_path / 'empty'
  (empty / 'checkpoints').mkdir(parents=True)
  config = parity.get_config('smoke')
  (empty / 'config.json').write_text(config.to_json())
  config.init_from, config.init_from_parts = str(empty), 'core'
  with pytest.raises(ValueError, match=r'config\.init_from=.*no committed checkpoint'):
    validation.validate(config)


@pytest.mark.slow  # three short training runs, 45 s each
def test_the_transfer_benchmark_trains_both_and_plots_them(tmp_path, capsys):
  from benchmarks import transfer  # pylint: disable=g-import-not-at-top

  transfer.main(['--config=configs/brackets.py:smoke', '--source_config=configs/parity.py:smoke',
                 '--source_budget=45', '--budget=45', '--track_every=10', f'--workdir={tmp_path}'])
  result = json.loads((tmp_path / 'transfer.json').read_text())
  assert (tmp_path / 'transfer.png').stat().st_size > 0
  for name in ('scratch', 'transfer'):
    points = result['curves'][name]
    assert len(points) >= 2 and all(0 <= p['acc'] <= 1 for p in points)
    assert points == sorted(points, key=lambda p: p['seconds'])
  assert 'initialised from' in (tmp_path / 'transfer.log').read_text()
  assert result['seconds_to_scratch_final']['scratch'] is not None
  printed = capsys.readouterr().out
  assert '| scratch |' in printed and '| transfer |' in printed


def test_the_benchmarks_default_configs_share_a_core_and_small_does_not():
  """benchmarks/transfer.py's defaults must transfer; brackets `small` widens the readout."""
  from benchmarks import compare_baselines  # pylint: disable=g-import-not-at-top
  import benchmarks.transfer as transfer_bench  # pylint: disable=g-import-not-at-top

  def core(spec):
    model = compare_baselines._load_config(spec, []).model  # pylint: disable=protected-access  # the benchmarks' reading of a spec
    return {field: model.get(field) for field in ctm_lib.CORE_FIELDS}

  parser_defaults = transfer_bench.parse_args([])
  assert core(parser_defaults.config) == core(parser_defaults.source_config)
  assert core('configs/brackets.py:small') != core(parser_defaults.source_config)
