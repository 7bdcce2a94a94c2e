"""The LSTM and feed-forward baselines as the trainer, the importer and the
exporter see them: `config.model_type` picks the class, the parity scripts'
variants, reference checkpoints of each baseline, artefacts that reload as the
same class. (Their numbers against the reference: golden_test.py.)"""

import argparse
import json

import numpy as np
import pytest
from absl import flags

from conftest import load_golden, needs_8_devices, state_dict, to_jax_layout
from ctm_jax import export
from ctm_jax import inference
from ctm_jax import train
from ctm_jax import validation
from ctm_jax.configs import digits as digits_configs
from ctm_jax.configs import parity as parity_configs
from ctm_jax.interop import torch as torch_interop
from ctm_jax.models import ff
from ctm_jax.models import lstm


def test_model_type_picks_the_class_and_an_unknown_one_is_named():
  config = parity_configs.get_config('lstm_smoke')
  model = validation.validate(config).make_model(config)
  assert isinstance(model, lstm.LSTMBaseline) and model.num_layers == 1
  config = digits_configs.get_config('smoke')
  config.model_type = 'ff'
  config.model.d_model = 48
  task = validation.validate(config)
  model = task.make_model(config)
  assert isinstance(model, ff.FFBaseline) and model.d_model == 48
  config.model_type = 'lstm'  # the image and maze scripts' default depth
  task = validation.validate(config)
  model = task.make_model(config)
  assert isinstance(model, lstm.LSTMBaseline) and model.num_layers == 2
  config = parity_configs.get_config('smoke')
  config.model_type = 'ff'  # parity has no feed-forward baseline
  with pytest.raises(ValueError, match=r"config.model_type='ff': task 'parity' trains 'ctm', 'lstm'"):
    validation.validate(config)
  config = parity_configs.get_config('lstm_smoke')
  config.model.d_modle = 3  # neither a CTM nor an LSTM option: still refused
  with pytest.raises(ValueError, match='d_modle'):
    validation.validate(config)


def test_parity_lstm_variants_are_the_scripts():
  base = parity_configs.get_config('default')
  for ticks, width in parity_configs.LSTM_WIDTHS.items():
    for certain in ((False, True) if ticks in (10, 25) else (False,)):
      name = f'lstm_{ticks}' + ('_certain' if certain else '')
      config = parity_configs.get_config(name)
      assert config.model_type == 'lstm' and config.model.num_layers == 1
      assert (config.model.iterations, config.model.d_model) == (ticks, width)
      assert config.gradient_clipping == -1 and config.use_most_certain is certain
      for key in ('lr', 'batch_size', 'batch_size_test', 'warmup_steps', 'training_iterations',
                  'parity_sequence_length', 'seed', 'weight_decay', 'scheduler_type'):
        assert config[key] == base[key], (name, key)
      for key in ('d_input', 'heads', 'backbone_type', 'positional_embedding_type', 'dropout'):
        assert config.model[key] == base.model[key], (name, key)


def _save(path, sd, args):
  torch = pytest.importorskip('torch')
  torch.save({'model_state_dict': {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()},
              'args': argparse.Namespace(**args)}, path)


@pytest.mark.parametrize('case', ['lstm_parity', 'lstm_compact', 'ff_image', 'ff_compact'])
def test_reference_baseline_checkpoints_import_and_reproduce_the_reference(case, tmp_path):
  arrays, meta = load_golden(case)
  kwargs = meta['constructor_kwargs']
  if case.startswith('lstm'):
    # tasks/parity/train.py's fields; it builds its LSTM with one layer, so
    # the golden's two-layer model is loaded with --task and a num_layers check.
    args = dict(model_type='lstm', parity_sequence_length=meta['inputs_spec']['length'],
                iterations=kwargs['iterations'],
                d_model=kwargs['d_model'], d_input=kwargs['d_input'], heads=kwargs['heads'],
                backbone_type=kwargs['backbone_type'], dropout=0.0,
                positional_embedding_type=kwargs['positional_embedding_type'],
                out_dims=kwargs['out_dims'],
                n_synch_out=32, memory_length=25)
    derived = torch_interop.model_kwargs_from_args(args)
    assert derived['num_layers'] == 1  # as the script builds it
    with pytest.raises(Exception, match='weight_ih_l1'):  # the golden model has two layers
      torch_interop.import_state_dict(state_dict(arrays, meta), derived, lstm.LSTMBaseline)
    return
  args = dict(model='ff', dataset='cifar10', d_model=kwargs['d_model'], backbone_type=kwargs['backbone_type'],
              dropout=0.0, d_input=32, heads=4, iterations=10, out_dims=10, num_layers=2)
  path = tmp_path / 'ff.pt'
  _save(path, state_dict(arrays, meta), args)
  config = torch_interop.import_checkpoint(str(path), str(tmp_path / 'run'))
  assert config['model_type'] == 'ff' and config['task'] == 'image_classification'
  model, variables, _ = inference.load(str(tmp_path / 'run'))
  assert isinstance(model, ff.FFBaseline)
  out = model.apply(variables, to_jax_layout(arrays['__in__x']))
  np.testing.assert_allclose(out.predictions[..., 0], arrays['__out__predictions'], atol=1e-4)


def test_reference_lstm_checkpoint_of_a_maze_script_imports(tmp_path):
  arrays, meta = load_golden('lstm_maze')
  kwargs = meta['constructor_kwargs']
  args = dict(model='lstm', dataset='mazes-small', maze_route_length=10, num_layers=kwargs['num_layers'],
              iterations=kwargs['iterations'], d_model=kwargs['d_model'], d_input=kwargs['d_input'],
              heads=kwargs['heads'], backbone_type=kwargs['backbone_type'], dropout=0.0,
              positional_embedding_type=kwargs['positional_embedding_type'], out_dims=50,
              n_synch_out=32, memory_length=25, expand_range=True)
  path = tmp_path / 'lstm.pt'
  _save(path, state_dict(arrays, meta), args)
  config = torch_interop.import_checkpoint(str(path), str(tmp_path / 'run'))
  assert config['model_type'] == 'lstm' and config['task'] == 'mazes'
  model, variables, loaded = inference.load(str(tmp_path / 'run'))
  assert isinstance(model, lstm.LSTMBaseline)
  out = model.apply(variables, to_jax_layout(arrays['__in__x']))
  np.testing.assert_allclose(out.predictions, arrays['__out__predictions'], atol=1e-4)
  # Exported, it reloads as the same baseline with the same outputs.
  artefact_dir = tmp_path / 'artefact'
  x = to_jax_layout(arrays['__in__x'])
  export.write(model, variables, loaded, str(artefact_dir), input_shape=x.shape[1:])
  spec = json.loads((artefact_dir / 'model.json').read_text())
  assert spec['model_type'] == 'lstm'
  again, again_variables, _ = inference.load(str(artefact_dir))
  assert isinstance(again, lstm.LSTMBaseline)
  np.testing.assert_allclose(
      again.apply(again_variables, to_jax_layout(arrays['__in__x'])).predictions, out.predictions, atol=1e-6
  )


@pytest.mark.slow  # a training run on 8 devices
@needs_8_devices
def test_lstm_baseline_trains_on_the_mesh_and_resumes(tmp_path):
  flags.FLAGS.mark_as_parsed()
  config = parity_configs.get_config('lstm_smoke')
  config.mesh.data, config.mesh.fsdp, config.mesh.neuron = 2, 2, 2
  state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    evals = [r for r in map(json.loads, f) if 'eval/acc_most_certain' in r]
  assert evals[-1]['eval/acc_last'] > 0.55  # chance is 0.5
  longer = config.copy_and_resolve_references()
  longer.training_iterations = config.training_iterations + 20
  resumed = train.train_and_evaluate(longer, str(tmp_path / 'run'))
  assert int(resumed.step) == longer.training_iterations and int(state.step) == config.training_iterations
  # A CTM config on the LSTM's workdir is refused: another model.
  ctm = parity_configs.get_config('smoke')
  ctm.mesh.data, ctm.mesh.fsdp, ctm.mesh.neuron = 2, 2, 2
  ctm.training_iterations = longer.training_iterations + 20
  with pytest.raises(Exception, match='model_type'):
    train.train_and_evaluate(ctm, str(tmp_path / 'run'))
