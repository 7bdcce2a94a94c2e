"""`python -m ctm_jax.interop.torch` on fake reference training checkpoints.

Each fake checkpoint is what the reference's training scripts torch.save: the
golden's state_dict under 'model_state_dict' and an argparse.Namespace under
'args', named as that script's parser names them.
"""

import argparse
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import assert_close, golden_path, load_golden, state_dict, to_jax_layout
from ctm_jax.interop import torch as torch_interop

torch = pytest.importorskip('torch')

# Golden case -> (task, task-specific args that give its out_dims / reshaper).
CASES = {
    'parity': ('parity', {'model_type': 'ctm', 'parity_sequence_length': 16, 'dataset': 'parity'}),
    'image_rp': ('image_classification', {'model': 'ctm', 'dataset': 'cifar10'}),
    'image_compact': ('image_classification', {'model': 'ctm', 'dataset': 'cifar10'}),
    'firstlast_unet8': (
        'mazes',
        {'model': 'ctm', 'dataset': 'mazes-small', 'maze_route_length': 10, 'expand_range': False},
    ),
    'maze_compact': (
        'mazes',
        {'model': 'ctm', 'dataset': 'mazes-small', 'maze_route_length': 6, 'expand_range': False},
    ),
}
MAZE_CASES = [case for case, (task, _) in CASES.items() if task == 'mazes']


def _at_hand(full, compact):
  """The full set's case where ../shared/golden has it, else its compact stand-in."""
  return full if golden_path(full) else compact


def reference_args(case, kwargs) -> argparse.Namespace:
  """The Namespace the case's training script would have saved."""
  task, extra = CASES[case]
  args = {
      'iterations': kwargs['iterations'],
      'd_model': kwargs['d_model'],
      'd_input': kwargs['d_input'],
      'heads': kwargs['heads'],
      'n_synch_out': kwargs['n_synch_out'],
      'n_synch_action': kwargs['n_synch_action'],
      'synapse_depth': kwargs['synapse_depth'],
      'memory_length': kwargs['memory_length'],
      'deep_memory': kwargs['deep_nlms'],
      'memory_hidden_dims': kwargs['memory_hidden_dims'],
      'do_normalisation': kwargs['do_layernorm_nlm'],
      'backbone_type': kwargs['backbone_type'],
      'positional_embedding_type': kwargs['positional_embedding_type'],
      'dropout': kwargs['dropout'],
      'neuron_select_type': kwargs['neuron_select_type'],
      'n_random_pairing_self': kwargs.get('n_random_pairing_self', 0),
      # Training-only fields the import must ignore; out_dims is set before saving.
      'lr': 1e-4,
      'batch_size': 32,
      'log_dir': 'logs/x',
      'seed': 412,
      'device': [-1],
      'out_dims': kwargs['out_dims'],
  }
  if task != 'parity':
    args['dropout_nlm'] = kwargs.get('dropout_nlm')
  args.update(extra)
  return argparse.Namespace(**args)


def save_checkpoint(path, sd, args, **extra):
  """What a reference training script saves; `extra` adds its other entries."""
  torch.save(
      {
          'model_state_dict': {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()},
          'optimizer_state_dict': {},
          'iteration': 7,
          'args': args,
          **extra,
      },
      path,
  )


def _cli(*flags):
  return subprocess.Popen(
      [sys.executable, '-m', 'ctm_jax.interop.torch', *flags],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


@pytest.fixture(scope='module')
def cli_runs(tmp_path_factory):
  """Every command-line run of this module, started at once (start-up dominates).

  Returns {name: (workdir, checkpoint, CompletedProcess)}.
  """
  root = tmp_path_factory.mktemp('cli')
  # The cases at hand (the big ones only with ../shared/golden); each test skips its own.
  goldens = {case: load_golden(case) for case in CASES if golden_path(case)}
  jobs = {}
  for case, (arrays, meta) in goldens.items():
    ckpt = root / f'{case}.pt'
    save_checkpoint(
        ckpt, state_dict(arrays, meta), reference_args(case, meta['constructor_kwargs'])
    )
    jobs[case] = (root / case, ckpt, [])

  # A renamed key.
  arrays, meta = goldens['parity']
  sd = state_dict(arrays, meta)
  sd['q_proj.wieght'] = sd.pop('q_proj.weight')
  ckpt = root / 'wrong_key.pt'
  save_checkpoint(ckpt, sd, reference_args('parity', meta['constructor_kwargs']))
  jobs['wrong_key'] = (root / 'wrong_key', ckpt, [])

  # A pickle payload in the args: refused on the command line too.
  save_checkpoint(root / 'payload.pt', sd, _Payload(str(root / 'payload_ran')))
  jobs['payload'] = (root / 'payload', root / 'payload.pt', [])

  # An existing workdir/checkpoint, refused and then replaced with --overwrite.
  for name, extra in (('existing', []), ('overwrite', ['--overwrite'])):
    sentinel = root / name / 'checkpoint' / 'keep.txt'
    sentinel.parent.mkdir(parents=True)
    sentinel.write_text('old')
    jobs[name] = (root / name, root / 'parity.pt', extra)

  procs = {
      name: _cli(f'--checkpoint={ckpt}', f'--workdir={workdir}', *extra)
      for name, (workdir, ckpt, extra) in jobs.items()
  }
  results = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=600)
    results[name] = (
        jobs[name][0],
        jobs[name][1],
        subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
    )
  return results


@pytest.mark.parametrize('case', list(CASES))
def test_cli_import_reproduces_reference(case, cli_runs):
  arrays, _ = load_golden(case)
  workdir, ckpt, result = cli_runs[case]
  assert result.returncode == 0, result.stderr
  assert str(workdir / 'checkpoint') in result.stdout

  model, variables, config = torch_interop.load_imported(str(workdir))
  assert config['task'] == CASES[case][0]
  assert config['source_checkpoint'] == str(ckpt)
  assert config['iteration'] == 7
  out = jax.jit(model.apply)(variables, to_jax_layout(arrays['__in__x']))
  assert_close(out.predictions, arrays['__out__predictions'], what='predictions')


@pytest.mark.parametrize('case', MAZE_CASES)
def test_imported_maze_model_reproduces_reference_predictions_from_a_png(case, cli_runs, tmp_path):
  """The golden maze drawn as a reference-format PNG (its route in blue), read
  back by the maze folder reader, gives the reference's own input and targets;
  the imported model then gives the reference's predictions."""
  from ctm_jax import inference  # pylint: disable=g-import-not-at-top
  from ctm_jax.data import mazes  # pylint: disable=g-import-not-at-top

  arrays, meta = load_golden(case)
  workdir, _, result = cli_runs[case]
  assert result.returncode == 0, result.stderr
  inputs_BxHxWx3 = to_jax_layout(arrays['__in__x'])
  (tmp_path / 'test' / 'mazes').mkdir(parents=True)
  for b, x_HxWx3 in enumerate(inputs_BxHxWx3):
    maze = mazes.Maze.from_image(x_HxWx3)
    path = mazes.shortest_path(maze.free_HxW, maze.start, maze.goal)
    mazes.write_png(str(tmp_path / 'test' / 'mazes' / f'{b}.png'), mazes.render(maze.free_HxW, path))
  folder = mazes.MazeFolder(str(tmp_path), 'test', route_length=meta['inputs_spec']['route_length'])
  model, variables, config = inference.load(str(workdir))
  expand_range = mazes.expand_range_of(config)
  assert expand_range is False
  records = mazes.ModelRecords(folder, expand_range)
  inputs = np.stack([records[b]['inputs'] for b in range(len(records))])
  np.testing.assert_array_equal(inputs, inputs_BxHxWx3)
  np.testing.assert_array_equal(
      np.stack([records[b]['targets'] for b in range(len(records))]), arrays['__target__targets']
  )
  out = jax.jit(model.apply)(variables, inputs)
  assert_close(out.predictions, arrays['__out__predictions'], what='predictions')


@pytest.mark.parametrize('case', list(CASES))
def test_derived_kwargs_match_golden_constructor(case):
  _, meta = load_golden(case)
  kwargs = meta['constructor_kwargs']
  derived = torch_interop.model_kwargs_from_args(reference_args(case, kwargs))
  expected = {'dropout_nlm': None, 'n_random_pairing_self': 0, **kwargs}
  assert derived == expected


def _parity_args(**overrides):
  _, meta = load_golden('parity')
  args = vars(reference_args('parity', meta['constructor_kwargs']))
  args.update(overrides)
  return {k: v for k, v in args.items() if v is not None}


@pytest.mark.parametrize(
    'field', ['d_model', 'deep_memory', 'do_normalisation', 'parity_sequence_length']
)
def test_missing_field_is_named(field):
  args = _parity_args(**{field: None})
  with pytest.raises(ValueError, match=field):
    torch_interop.model_kwargs_from_args(args, task='parity')


def test_mazes_without_route_length_and_unknown_dataset_are_named():
  case = _at_hand('firstlast_unet8', 'maze_compact')
  _, meta = load_golden(case)
  route_length = meta['inputs_spec']['route_length']
  args = vars(reference_args(case, meta['constructor_kwargs']))
  del args['maze_route_length']
  with pytest.raises(ValueError, match='maze_route_length'):
    torch_interop.model_kwargs_from_args(args, task='mazes')
  image = {k: v for k, v in args.items() if k not in ('out_dims',)}
  image['dataset'] = 'svhn'
  with pytest.raises(ValueError, match='dataset'):
    torch_interop.model_kwargs_from_args(image)
  with pytest.raises(ValueError, match="model='rnn'"):
    torch_interop.model_kwargs_from_args({**args, 'maze_route_length': route_length, 'model': 'rnn'})
  with pytest.raises(ValueError, match='num_layers'):  # an LSTM baseline's args, one short
    torch_interop.model_kwargs_from_args(
        {**args, 'maze_route_length': route_length, 'model': 'lstm'}
    )
  with pytest.raises(ValueError, match='out_dims'):
    torch_interop.model_kwargs_from_args({**args, 'maze_route_length': route_length + 1})


def test_cli_refuses_a_pickle_payload_in_one_line(cli_runs):
  workdir, ckpt, result = cli_runs['payload']
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'refused to unpickle' in lines[0], result.stderr
  assert str(ckpt) in lines[0] and '--trust_pickle' in lines[0]
  assert not (ckpt.parent / 'payload_ran').exists()
  assert not workdir.exists()


def test_wrong_key_fails_listing_it_and_writes_nothing(cli_runs):
  workdir, _, result = cli_runs['wrong_key']
  assert result.returncode != 0
  assert 'q_proj.wieght' in result.stderr, result.stderr
  assert 'tick/q_proj/kernel' in result.stderr, result.stderr
  assert not workdir.exists()


def test_existing_checkpoint_is_not_overwritten(cli_runs):
  workdir, _, result = cli_runs['existing']
  assert result.returncode != 0
  assert 'already holds an imported model; pass --overwrite' in result.stderr, result.stderr
  assert (workdir / 'checkpoint' / 'keep.txt').read_text() == 'old'
  assert sorted(os.listdir(workdir)) == ['checkpoint']


def test_overwrite_replaces_existing_checkpoint(cli_runs):
  workdir, _, result = cli_runs['overwrite']
  assert result.returncode == 0, result.stderr
  assert not (workdir / 'checkpoint' / 'keep.txt').exists()
  _, _, config = torch_interop.load_imported(str(workdir))
  assert config['task'] == 'parity'


def test_unknown_task_is_named_and_nothing_written(tmp_path):
  workdir = tmp_path / 'imported'
  with pytest.raises(ValueError, match=r"--task='no_such_task' is unknown; expected one of .*parity"):
    torch_interop.import_checkpoint(str(tmp_path / 'any.pt'), str(workdir), task='no_such_task')
  assert not workdir.exists()


class _Payload:
  """Unpickling this opens (creates) `marker` for writing: code the file chose."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def _golden_parity_checkpoint(path, **extra):
  arrays, meta = load_golden('parity')
  args = reference_args('parity', meta['constructor_kwargs'])
  save_checkpoint(path, state_dict(arrays, meta), args, **extra)


def test_full_reference_save_imports_without_trusting_pickle(tmp_path):
  """Everything the reference's scripts save beside the weights (RNG states,
  metric lists of numpy scalars, scaler and scheduler state) loads weights-only."""
  rng = np.random.RandomState(3)
  import random  # pylint: disable=g-import-not-at-top

  extra = {
      'torch_rng_state': torch.get_rng_state(),
      'numpy_rng_state': rng.get_state(),
      'random_rng_state': random.Random(1).getstate(),
      'train_losses': [np.float64(0.5), np.float32(0.25)],
      'test_accuracies': [np.zeros((3, 4), np.float32)],
      'scaler_state_dict': {'scale': 65536.0, '_growth_tracker': 0},
      'scheduler_state_dict': {'last_epoch': 7, '_last_lr': [1e-4]},
  }
  _golden_parity_checkpoint(tmp_path / 'full.pt', **extra)
  config = torch_interop.import_checkpoint(str(tmp_path / 'full.pt'), str(tmp_path / 'w'))
  assert config['task'] == 'parity' and config['iteration'] == 7


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
  marker = tmp_path / 'payload_ran'
  arrays, meta = load_golden('parity')
  save_checkpoint(tmp_path / 'evil.pt', state_dict(arrays, meta), _Payload(str(marker)))
  workdir = tmp_path / 'w'
  with pytest.raises(ValueError, match='refused to unpickle.*--trust_pickle') as error:
    torch_interop.import_checkpoint(str(tmp_path / 'evil.pt'), str(workdir))
  assert '\n' not in str(error.value)
  assert not marker.exists()
  assert not workdir.exists()


def test_non_finite_weights_are_refused_by_name(tmp_path):
  arrays, meta = load_golden('parity')
  sd = state_dict(arrays, meta)
  sd['q_proj.weight'] = np.array(sd['q_proj.weight'], copy=True)
  sd['q_proj.weight'][0, 0] = np.nan
  save_checkpoint(tmp_path / 'nan.pt', sd, reference_args('parity', meta['constructor_kwargs']))
  with pytest.raises(ValueError, match=r'non-finite weights .* q_proj\.weight'):
    torch_interop.import_checkpoint(str(tmp_path / 'nan.pt'), str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('damage', ['truncated', 'not_torch', 'empty'])
def test_unreadable_file_is_one_line(tmp_path, damage):
  path = tmp_path / 'bad.pt'
  if damage == 'truncated':
    _golden_parity_checkpoint(path)
    path.write_bytes(path.read_bytes()[:2000])
  elif damage == 'not_torch':
    path.write_text('a text file, not a checkpoint\n')
  else:
    path.write_bytes(b'')
  with pytest.raises(ValueError, match='not a readable PyTorch checkpoint') as error:
    torch_interop.import_checkpoint(str(path), str(tmp_path / 'w'))
  assert '\n' not in str(error.value)
  assert not (tmp_path / 'w').exists()


def test_trust_pickle_loads_what_weights_only_refuses(tmp_path):
  """Args saved as another object type: refused by default, imported when trusted."""
  import types  # pylint: disable=g-import-not-at-top

  arrays, meta = load_golden('parity')
  args = types.SimpleNamespace(**vars(reference_args('parity', meta['constructor_kwargs'])))
  save_checkpoint(tmp_path / 'other.pt', state_dict(arrays, meta), args)
  with pytest.raises(ValueError, match='refused to unpickle'):
    torch_interop.import_checkpoint(str(tmp_path / 'other.pt'), str(tmp_path / 'w'))
  config = torch_interop.import_checkpoint(
      str(tmp_path / 'other.pt'), str(tmp_path / 'w'), trust_pickle=True
  )
  assert config['task'] == 'parity'


# The only args the reference's released ImageNet checkpoint saves (its
# inference notebook loads it with strict=False).
RELEASED_IMAGENET_ARGS = (
    'backbone_type', 'd_input', 'd_model', 'deep_memory', 'do_normalisation', 'heads',
    'iterations', 'memory_hidden_dims', 'memory_length', 'n_random_pairing_self',
    'n_synch_action', 'n_synch_out', 'neuron_select_type', 'out_dims',
    'positional_embedding_type', 'synapse_depth',
)


def _released_imagenet(tmp_path, extra_key=False, drop_key=None):
  """The golden image model with 1000 classes, saved as the released checkpoint is."""
  case = _at_hand('image_rp', 'image_compact')
  arrays, meta = load_golden(case)
  sd = state_dict(arrays, meta)
  rng = np.random.default_rng(0)
  synch = sd['output_projector.0.weight'].shape[1]
  sd['output_projector.0.weight'] = rng.standard_normal((1000, synch)).astype(np.float32)
  sd['output_projector.0.bias'] = rng.standard_normal(1000).astype(np.float32)
  if extra_key:
    sd['legacy_buffer'] = np.zeros(3, np.float32)
  if drop_key:
    del sd[drop_key]
  full = vars(reference_args(case, {**meta['constructor_kwargs'], 'out_dims': 1000}))
  args = argparse.Namespace(**{k: full[k] for k in RELEASED_IMAGENET_ARGS})
  path = tmp_path / 'ctm_imagenet.pt'
  torch.save({'model_state_dict': {k: torch.from_numpy(v) for k, v in sd.items()}, 'args': args}, path)
  return path, sd


def test_released_imagenet_args_import_as_imagenet_classification(tmp_path):
  path, sd = _released_imagenet(tmp_path)
  config = torch_interop.import_checkpoint(str(path), str(tmp_path / 'run'))
  assert config['task'] == 'image_classification' and config['skipped'] == []
  assert config['model_kwargs']['out_dims'] == 1000 and config['model_kwargs']['dropout'] == 0.0
  model, variables, _ = torch_interop.load_imported(str(tmp_path / 'run'))
  out = model.apply(variables, np.ones((2, 32, 32, 3), np.float32))
  assert out.predictions.shape[:2] == (2, 1000)
  np.testing.assert_array_equal(
      variables['params']['tick']['output_projector_0']['kernel'], sd['output_projector.0.weight'].T
  )


@pytest.mark.slow  # over 10 s: the slow tier (CI runs it after the default suite)
def test_released_checkpoint_strict_and_not_strict(tmp_path):
  path, _ = _released_imagenet(tmp_path, extra_key=True, drop_key='start_trace')
  with pytest.raises(torch_interop.StateDictMismatch, match=r'(?s)unknown keys \(1\).*legacy_buffer.*missing variables \(1\)'):
    torch_interop.import_checkpoint(str(path), str(tmp_path / 'strict'))
  assert not (tmp_path / 'strict').exists()
  proc = subprocess.run(
      [sys.executable, '-m', 'ctm_jax.interop.torch', f'--checkpoint={path}',
       f'--workdir={tmp_path / "loose"}', '--strict=false'],
      capture_output=True, text=True, timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'not strict, 2 key(s) skipped' in proc.stdout
  assert 'ignored key legacy_buffer' in proc.stdout
  assert 'missing, left at initialisation: params/start_trace' in proc.stdout, proc.stdout
  _, variables, config = torch_interop.load_imported(str(tmp_path / 'loose'))
  assert config['strict'] is False and len(config['skipped']) == 2
  assert np.all(np.isfinite(variables['params']['start_trace']))


def test_a_checkpoint_without_args_imports_with_model_kwargs(tmp_path):
  """The community's checkpoints ({'model_state_dict': ...}, kwargs on the model card)."""
  arrays, meta = load_golden('parity')
  ckpt = tmp_path / 'community.pt'
  torch.save({'model_state_dict': {k: torch.from_numpy(np.asarray(v)) for k, v in
                                   state_dict(arrays, meta).items()}}, ckpt)
  with pytest.raises(ValueError, match=r'community.pt: the checkpoint saved no args; give the constructor kwargs with --model_kwargs'):
    torch_interop.import_checkpoint(str(ckpt), str(tmp_path / 'refused'))
  kwargs = dict(meta['constructor_kwargs'])
  heads = kwargs.pop('heads')
  with pytest.raises(ValueError, match=r"no value for constructor kwarg 'heads'"):
    torch_interop.import_checkpoint(str(ckpt), str(tmp_path / 'refused'), model_kwargs=kwargs)
  assert not (tmp_path / 'refused').exists()
  config = torch_interop.import_checkpoint(str(ckpt), str(tmp_path / 'imported'),
                                           model_kwargs={**kwargs, 'heads': heads})
  assert config['task'] == 'parity' and config['defaults'] == ['dropout_nlm', 'n_random_pairing_self']
  model, variables, _ = torch_interop.load_imported(str(tmp_path / 'imported'))
  out = jax.jit(model.apply)(variables, to_jax_layout(arrays['__in__x']))
  assert_close(out.predictions, arrays['__out__predictions'], what='predictions')
  # A checkpoint with args takes its kwargs from them, not from --model_kwargs.
  with_args = tmp_path / 'with_args.pt'
  save_checkpoint(with_args, state_dict(arrays, meta), reference_args('parity', meta['constructor_kwargs']))
  with pytest.raises(ValueError, match=r'--model_kwargs: .*with_args.pt saved its args'):
    torch_interop.import_checkpoint(str(with_args), str(tmp_path / 'x'), model_kwargs={'heads': 2})
