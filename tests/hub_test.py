"""The reference's Hub models in, offline: caches in the Hub library's own
layout, built here from the goldens' state_dicts saved as the reference's
mixin saves them (config.json + model.safetensors, shared tensors once)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import assert_close, load_golden, state_dict, to_jax_layout
import ctm_jax
from ctm_jax import extras
from ctm_jax import inference
from ctm_jax.interop import hub
from ctm_jax.interop import torch as torch_interop

CASES = {'maze_compact': 'mazes', 'parity': 'parity', 'image_compact': 'image_classification', 'sort': 'sort'}
COMMIT = '0123456789abcdef0123456789abcdef01234567'


def save_like_the_mixin(folder, arrays, meta, kwargs=None):
  """config.json + model.safetensors as PyTorchModelHubMixin writes them: a
  tensor sharing memory with another (first-last's `_right` index buffers)
  is stored once, the metadata naming the kept twin."""
  save_file = extras.module('safetensors.numpy', 'the Hub tests').save_file
  tensors = dict(state_dict(arrays, meta))
  metadata = {'format': 'pt'}
  for name in list(tensors):
    twin = name.replace('_right', '_left')
    if twin != name and twin in tensors and np.array_equal(tensors[twin], tensors[name]):
      metadata[name] = twin
      del tensors[name]
  os.makedirs(folder, exist_ok=True)
  save_file(tensors, os.path.join(folder, hub.WEIGHTS_FILE), metadata=metadata)
  with open(os.path.join(folder, hub.CONFIG_FILE), 'w') as f:
    json.dump(meta['constructor_kwargs'] if kwargs is None else kwargs, f)
  return metadata


def cache_repo(hf_home, repo_id, folder):
  """`folder`'s files as the Hub cache holds revision main of `repo_id`."""
  repo = hf_home / 'hub' / f'models--{repo_id.replace("/", "--")}'
  (repo / 'refs').mkdir(parents=True, exist_ok=True)
  (repo / 'refs' / 'main').write_text(COMMIT)
  snapshot = repo / 'snapshots' / COMMIT
  snapshot.mkdir(parents=True, exist_ok=True)
  for name in os.listdir(folder):
    (snapshot / name).write_bytes((folder / name).read_bytes())


def cached_golden(hf_home, tmp_path, case, repo_id):
  """Golden `case` saved as the mixin saves it in tmp_path/repo, cached as `repo_id`."""
  arrays, meta = load_golden(case)
  save_like_the_mixin(tmp_path / 'repo', arrays, meta)
  cache_repo(hf_home, repo_id, tmp_path / 'repo')
  return arrays, meta, tmp_path / 'repo'


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
  """An empty Hub cache with the library offline (HF_HOME, HF_HUB_OFFLINE=1)."""
  constants = extras.module('huggingface_hub.constants', 'the Hub tests')
  hf_home = tmp_path / 'hf_home'
  monkeypatch.setenv('HF_HOME', str(hf_home))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(hf_home / 'hub'))
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  return hf_home


def _assert_reference_outputs(model, variables, arrays):
  out = jax.jit(model.apply)(variables, to_jax_layout(arrays['__in__x']))
  assert_close(out.predictions, arrays['__out__predictions'], what='predictions')
  assert_close(out.certainties, arrays['__out__certainties'], what='certainties')


@pytest.mark.parametrize('case', sorted(CASES))
def test_hub_model_imports_to_the_reference_outputs(case, offline_hub, tmp_path):
  arrays, meta = load_golden(case)
  folder = tmp_path / 'repo'
  metadata = save_like_the_mixin(folder, arrays, meta)
  if meta['constructor_kwargs'].get('neuron_select_type') == 'first-last':
    assert any(k.endswith('_right') for k in metadata)  # the shared buffers were stored once
  cache_repo(offline_hub, f'test-org/{case}', folder)
  model, variables, config = ctm_jax.from_pretrained(f'hf://test-org/{case}')
  assert config.task == CASES[case]
  _assert_reference_outputs(model, variables, arrays)
  # The folder itself, and the same through inference.load (what predict and export read).
  model, variables, config = inference.load(str(folder))
  assert config.task == CASES[case]
  _assert_reference_outputs(model, variables, arrays)


def test_import_command_reads_the_hub_offline_without_torch(offline_hub, tmp_path):
  arrays, meta, folder = cached_golden(offline_hub, tmp_path, 'maze_compact', 'test-org/maze')
  workdir = tmp_path / 'imported'
  # The Hub path never imports torch: a torch that fails to import cannot stop it.
  blocker = tmp_path / 'no_torch'
  blocker.mkdir()
  (blocker / 'torch.py').write_text('raise ImportError("torch is blocked in this test")\n')
  env = {**os.environ, 'HF_HOME': str(offline_hub), 'HF_HUB_OFFLINE': '1',
         'PYTHONPATH': os.pathsep.join([str(blocker), os.environ.get('PYTHONPATH', '')])}
  done = subprocess.run(
      [sys.executable, '-m', 'ctm_jax.interop.torch', '--checkpoint=hf://test-org/maze@main',
       f'--workdir={workdir}'],
      capture_output=True, text=True, env=env, timeout=300,
  )
  assert done.returncode == 0, done.stderr
  record = json.loads((workdir / 'config.json').read_text())
  assert record['task'] == 'mazes' and record['source_checkpoint'] == 'hf://test-org/maze@main'
  # Kwargs config.json leaves out take the constructor's defaults, each listed.
  assert set(record['defaults']) == {'dropout_nlm', 'n_random_pairing_self'}
  model, variables, _ = inference.load(str(workdir))
  _assert_reference_outputs(model, variables, arrays)
  # Offline, a repo not in the cache: one line naming the repo, the file and the fix.
  done = subprocess.run(
      [sys.executable, '-m', 'ctm_jax.interop.torch', '--checkpoint=hf://test-org/absent',
       f'--workdir={tmp_path / "absent"}'],
      capture_output=True, text=True, env=env, timeout=300,
  )
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and 'hf://test-org/absent: model.safetensors: not in the Hub cache' in lines[0]
  assert 'hf download test-org/absent' in lines[0]
  assert not (tmp_path / 'absent').exists()


def test_damaged_weights_are_refused_in_one_line_and_nothing_is_written(offline_hub, tmp_path):
  arrays, meta = load_golden('parity')
  save_file = extras.module('safetensors.numpy', 'the Hub tests').save_file
  good = state_dict(arrays, meta)
  some = sorted(k for k in good if good[k].ndim == 2 and not k.startswith('attention.'))[0]
  cases = {
      'mis-shaped': ({**good, some: good[some][:, :-1]}, some),
      'missing': ({k: v for k, v in good.items() if k != some}, some),
      'extra': ({**good, 'stray.weight': np.zeros(3, np.float32)}, 'stray.weight'),
  }
  for what, (tensors, named) in cases.items():
    folder = tmp_path / what
    folder.mkdir()
    save_file(tensors, str(folder / hub.WEIGHTS_FILE))
    (folder / hub.CONFIG_FILE).write_text(json.dumps(meta['constructor_kwargs']))
    workdir = tmp_path / f'{what}_import'
    with pytest.raises(ValueError) as raised:
      torch_interop.import_checkpoint(str(folder), str(workdir))
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and named.split('.')[0] in message, (what, message)
    assert not workdir.exists(), what
  (tmp_path / 'garbage.safetensors').write_bytes(b'not a safetensors file at all')
  with pytest.raises(ValueError, match=r'garbage.safetensors: not a readable safetensors file'):
    hub.read_safetensors(str(tmp_path / 'garbage.safetensors'))


def test_a_bare_safetensors_takes_model_kwargs_and_a_missing_one_is_named(tmp_path):
  arrays, meta = load_golden('parity')
  folder = tmp_path / 'repo'
  save_like_the_mixin(folder, arrays, meta)
  weights = str(folder / hub.WEIGHTS_FILE)
  kwargs = dict(meta['constructor_kwargs'])
  (tmp_path / 'kwargs.json').write_text(json.dumps(kwargs))
  parsed = hub.parse_model_kwargs(f'@{tmp_path / "kwargs.json"}')
  assert parsed == kwargs
  config = torch_interop.import_checkpoint(weights, str(tmp_path / 'imported'), model_kwargs=parsed)
  assert config['task'] == 'parity'
  model, variables, _ = inference.load(str(tmp_path / 'imported'))
  _assert_reference_outputs(model, variables, arrays)
  with pytest.raises(ValueError, match=r'no config.json beside the weights; give the constructor kwargs'):
    torch_interop.import_checkpoint(weights, str(tmp_path / 'bare'))
  del kwargs['heads']
  with pytest.raises(ValueError, match=r"""no value for constructor kwarg 'heads'; give it with --model_kwargs='\{"heads": ...\}'"""):
    torch_interop.import_checkpoint(weights, str(tmp_path / 'bare'), model_kwargs=kwargs)
  with pytest.raises(ValueError, match=r'--model_kwargs=\{1: not JSON'):
    hub.parse_model_kwargs('{1')
  assert not (tmp_path / 'bare').exists()


def test_task_detection_from_kwargs_and_the_task_override(tmp_path):
  arrays, meta = load_golden('parity')
  kwargs = {**meta['constructor_kwargs'], 'backbone_type': 'none', 'prediction_reshaper': [-1]}
  with pytest.raises(ValueError, match=r'cannot tell the task from its kwargs \(no task recognises them\); pass --task'):
    torch_interop.detect_task_from_kwargs(kwargs, 'hf://x/y')
  folder = tmp_path / 'repo'
  save_like_the_mixin(folder, arrays, meta)
  model, _, config = inference.from_pretrained(str(folder), task='parity')
  assert config.task == 'parity' and model.out_dims == meta['constructor_kwargs']['out_dims']
  with pytest.raises(ValueError, match=r"--task=rl: it imports no reference checkpoints|constructor kwarg"):
    inference.from_pretrained(str(folder), task='rl')


def test_hub_errors_are_one_line_naming_repo_file_and_fix(monkeypatch):
  hub_lib = extras.module('huggingface_hub', 'the Hub tests')
  errors = extras.module('huggingface_hub.errors', 'the Hub tests')

  def raising(error):
    def download(*args, **kwargs):
      raise error
    return download

  response = type('Response', (), {'headers': {}, 'status_code': 401, 'url': 'https://huggingface.co',
                                   'request': None, 'json': lambda self: {}})()
  cases = [
      (errors.GatedRepoError('gated', response=response), 'the repo is gated; accept its terms'),
      (errors.RepositoryNotFoundError('absent', response=response), 'no such repo on the Hub'),
      (OSError(28, 'No space left on device'), 'download failed'),
      (errors.EntryNotFoundError('absent'), 'the repo has no such file'),
  ]
  for error, said in cases:
    monkeypatch.setattr(hub_lib, 'hf_hub_download', raising(error))
    with pytest.raises(ValueError) as raised:
      hub.download('hf://org/name', hub.WEIGHTS_FILE)
    message = str(raised.value)
    assert message.startswith('hf://org/name: model.safetensors: ') and said in message, message
    assert len(message.splitlines()) == 1
  with pytest.raises(ValueError, match=r'hf://org: expected hf://ORG/NAME'):
    hub.parse('hf://org')


def test_predict_and_export_take_a_hub_model(offline_hub, tmp_path):
  from ctm_jax import export  # pylint: disable=g-import-not-at-top
  from ctm_jax import predict  # pylint: disable=g-import-not-at-top

  arrays, meta, folder = cached_golden(offline_hub, tmp_path, 'parity', 'test-org/parity')
  length = meta['constructor_kwargs']['prediction_reshaper'][0]
  bits = ''.join('1' if b > 0 else '0' for b in arrays['__in__x'][0, :length])
  rows, summary = predict.predict('hf://test-org/parity', bits)
  assert summary['task'] == 'parity' and len(rows) == meta['constructor_kwargs']['iterations']
  spec = export.export('hf://test-org/parity', str(tmp_path / 'artefact'), input_shape=(length,))
  assert spec['task'] == 'parity' and spec['source'] == {'workdir': 'hf://test-org/parity', 'step': None}
  model, variables, _ = inference.load(str(tmp_path / 'artefact'))
  _assert_reference_outputs(model, variables, arrays)


def test_evaluate_takes_a_hub_model_with_a_config_for_its_data(offline_hub, tmp_path):
  from ctm_jax import evaluate  # pylint: disable=g-import-not-at-top
  from ctm_jax import validation  # pylint: disable=g-import-not-at-top
  from ctm_jax.configs import parity  # pylint: disable=g-import-not-at-top

  arrays, meta, folder = cached_golden(offline_hub, tmp_path, 'parity', 'test-org/parity')
  config = parity.get_config('smoke')
  config.n_test_batches = 2
  with pytest.raises(validation.UsageError, match=r'--workdir=hf://test-org/parity: an imported model.*--config=configs/<task>.py'):
    evaluate.evaluate('hf://test-org/parity', out=str(tmp_path / 'e'))
  with pytest.raises(validation.UsageError, match=r'pass --out=DIR'):
    evaluate.evaluate('hf://test-org/parity', config=config)
  # The config's model fields come from the import; what the task derives must be set by hand.
  with pytest.raises(ValueError, match=r"config\.init_from='hf://test-org/parity': the imported model differs .* out_dims"):
    evaluate.evaluate('hf://test-org/parity', out=str(tmp_path / 'e'), config=config)
  assert not (tmp_path / 'e').exists()
  config.parity_sequence_length = meta['constructor_kwargs']['prediction_reshaper'][0]
  scalars = evaluate.evaluate('hf://test-org/parity', out=str(tmp_path / 'hub'), config=config)
  assert 0 <= scalars['eval/acc_most_certain'] <= 1
  assert json.loads((tmp_path / 'hub' / 'metrics.json').read_text()) == scalars
  # An import workdir of the same weights evaluates the same; other weights do not.
  torch_interop.import_checkpoint(str(folder), str(tmp_path / 'imported'))
  imported = evaluate.evaluate(str(tmp_path / 'imported'), out=str(tmp_path / 'imp'), config=config)
  timeless = lambda s: {k: v for k, v in s.items() if not k.endswith('elapsed_s')}
  assert timeless(imported) == timeless(scalars)
  arrays = {k: v * 0.5 if k.endswith('.weight') else v for k, v in arrays.items()}
  save_like_the_mixin(tmp_path / 'halved', arrays, meta)
  other = evaluate.evaluate(str(tmp_path / 'halved'), out=str(tmp_path / 'other'), config=config)
  assert timeless(other) != timeless(scalars)
  # The command: --config and its overrides, a mistake in them one line.
  env = {**os.environ, 'HF_HOME': str(offline_hub), 'HF_HUB_OFFLINE': '1'}
  command = [sys.executable, '-m', 'ctm_jax.evaluate', '--workdir=hf://test-org/parity',
             '--config=configs/parity.py:smoke', '--n_test_batches=2', f'--out={tmp_path / "cli"}']
  done = subprocess.run(command + [f'--config.parity_sequence_length={config.parity_sequence_length}'],
                        capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr
  assert timeless(json.loads((tmp_path / 'cli' / 'metrics.json').read_text())) == timeless(scalars)
  done = subprocess.run(command + ['--config.parity_length=16'], capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 2 and done.stderr.startswith('ctm_jax.evaluate: --config.parity_length: ')
  assert len(done.stderr.strip().splitlines()) == 1, done.stderr
  # A run is evaluated with its own config: --config is refused there.
  with pytest.raises(validation.UsageError, match=r'--config: .* a training run'):
    evaluate.evaluate(str(tmp_path / 'run'), config=config)


def test_init_from_a_hub_model_starts_training_from_its_weights(offline_hub, tmp_path):
  import chex  # pylint: disable=g-import-not-at-top
  from ctm_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from ctm_jax import sharding  # pylint: disable=g-import-not-at-top
  from ctm_jax import train  # pylint: disable=g-import-not-at-top
  from ctm_jax import validation  # pylint: disable=g-import-not-at-top
  from ctm_jax.configs import parity  # pylint: disable=g-import-not-at-top

  arrays, meta, folder = cached_golden(offline_hub, tmp_path, 'parity', 'test-org/parity')
  kwargs = meta['constructor_kwargs']
  config = parity.get_config('smoke')
  config.parity_sequence_length = kwargs['prediction_reshaper'][0]
  config.model.update({k: v for k, v in kwargs.items() if k in set(config.model)})
  config.init_from = 'hf://test-org/parity'
  task = validation.validate(config)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / 'run'), keep=1)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    program = task.training(config, task.make_model(config)).program(mesh, str(tmp_path / 'plots'), 0.0)
    state, how = train._initial_state(config, program, checkpointer, same_model=True)  # pylint: disable=protected-access
  checkpointer.close()
  assert how == 'initialised from hf://test-org/parity'
  _, variables, _ = ctm_jax.from_pretrained('hf://test-org/parity')
  chex.assert_trees_all_equal(state.params, variables['params'])
  # Another model, or a repo the cache lacks offline, is refused before anything is written.
  config.model.d_model = kwargs['d_model'] * 2
  with pytest.raises(ValueError, match=r"config\.init_from='hf://test-org/parity': the imported model differs .* d_model"):
    validation.validate(config)
  config.model.d_model = kwargs['d_model']
  config.init_from = 'hf://test-org/absent'
  with pytest.raises(ValueError, match=r'config\.init_from=.*hf://test-org/absent: config.json: not in the Hub cache'):
    train.train_and_evaluate(config, str(tmp_path / 'run2'))
  assert not (tmp_path / 'run2').exists()


def test_the_maze_generalisation_tool_takes_a_hub_model(offline_hub, tmp_path):
  from ctm_jax import validation  # pylint: disable=g-import-not-at-top
  from ctm_jax.tools import mazes_generalisation  # pylint: disable=g-import-not-at-top

  arrays, meta, folder = cached_golden(offline_hub, tmp_path, 'maze_compact', 'test-org/maze')
  with pytest.raises(validation.UsageError, match=r'a Hub model; give --out'):
    mazes_generalisation.run('hf://test-org/maze', [9], 2, 2)
  out = tmp_path / 'generalisation'
  rows = mazes_generalisation.run('hf://test-org/maze', [9], 2, 2, out=str(out), pictures=1)
  assert [size for size, _ in rows] == [9]
  record = json.loads((out / 'results.json').read_text())
  assert record['workdir'] == 'hf://test-org/maze' and len(record['sizes']['9']['solved']) == 2
  # The Hub's held-out mazes instead of generated ones.
  cache_maze_dataset(offline_hub, 'test-org/mazes-tiny', 15, {'test': 3})
  rows = mazes_generalisation.run('hf://test-org/maze', [9], 2, 2, out=str(out), pictures=0, overwrite=True,
                                  data_dir='hf://test-org/mazes-tiny')
  assert [(size, summary['mazes']) for size, summary in rows] == [(15, 2)]


@pytest.mark.parametrize('case', ['maze_compact', 'image_compact'])
def test_import_export_import_round_trip_is_exact(case, tmp_path):
  from ctm_jax import export  # pylint: disable=g-import-not-at-top

  arrays, meta = load_golden(case)
  folder = tmp_path / 'repo'
  metadata = save_like_the_mixin(folder, arrays, meta)
  imported = tmp_path / 'imported'
  torch_interop.import_checkpoint(str(folder), str(imported))
  out = tmp_path / 'exported'
  written = export.export_hf(str(imported), str(out))
  assert set(written) == {'config.json', 'model.safetensors', 'README.md'}
  # The same tensors as the reference's state_dict, shared ones stored once as the mixin does.
  again = hub.read_safetensors(str(out / hub.WEIGHTS_FILE))
  original = state_dict(arrays, meta)
  assert sorted(again) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(again[name], value, err_msg=name, strict=True)  # shapes too
  safe_open = extras.module('safetensors', 'the Hub tests').safe_open
  with safe_open(str(out / hub.WEIGHTS_FILE), framework='np') as f:
    assert f.metadata() == metadata
  exported_kwargs = json.loads((out / hub.CONFIG_FILE).read_text())
  assert {k: exported_kwargs[k] for k in meta['constructor_kwargs']} == meta['constructor_kwargs']
  card = (out / 'README.md').read_text()
  assert 'from_pretrained' in card and 'load_model' in card and exported_kwargs['backbone_type'] in card
  # Imported back: the very same variables.
  _, first, _ = inference.load(str(imported))
  _, second, config = ctm_jax.from_pretrained(str(out))
  jax.tree.map(np.testing.assert_array_equal, first, second)
  assert config.task == CASES[case]
  with pytest.raises(Exception, match='already holds a model in the Hub format; pass --overwrite'):
    export.export_hf(str(imported), str(out))


def test_push_to_hub_uploads_the_folder_with_the_library(tmp_path, monkeypatch):
  hub_lib = extras.module('huggingface_hub', 'the Hub tests')
  calls = []

  class FakeApi:
    def create_repo(self, repo_id, **kwargs):
      calls.append(('create_repo', repo_id, kwargs))

    def upload_folder(self, **kwargs):
      calls.append(('upload_folder', kwargs['repo_id'], sorted(os.listdir(kwargs['folder_path']))))

  monkeypatch.setattr(hub_lib, 'HfApi', FakeApi)
  arrays, meta = load_golden('parity')
  folder = tmp_path / 'repo'
  save_like_the_mixin(folder, arrays, meta)
  from ctm_jax import export  # pylint: disable=g-import-not-at-top
  written = export.export_hf(str(folder), str(tmp_path / 'out'), push_to_hub='me/parity-ctm')
  assert written['url'] == 'https://huggingface.co/me/parity-ctm'
  assert calls == [
      ('create_repo', 'me/parity-ctm', {'repo_type': 'model', 'exist_ok': True}),
      ('upload_folder', 'me/parity-ctm', ['README.md', 'config.json', 'model.safetensors']),
  ]
  with pytest.raises(ValueError, match=r'--push_to_hub=nope: expected ORG/NAME'):
    hub.push(str(tmp_path / 'out'), 'nope')


def test_export_command_writes_the_hub_format(tmp_path, capsys):
  import types  # pylint: disable=g-import-not-at-top
  from ctm_jax import export  # pylint: disable=g-import-not-at-top
  from ctm_jax import validation  # pylint: disable=g-import-not-at-top

  arrays, meta = load_golden('parity')
  folder = tmp_path / 'repo'
  save_like_the_mixin(folder, arrays, meta)
  flags = dict(workdir=str(folder), out=str(tmp_path / 'out'), step=None, input_shape='',
               overwrite=False, format='hf', push_to_hub='')
  export._run(types.SimpleNamespace(**flags))  # pylint: disable=protected-access
  assert 'in the Hub format: config.json' in capsys.readouterr().out
  assert (tmp_path / 'out' / hub.WEIGHTS_FILE).exists()
  with pytest.raises(validation.UsageError, match='--push_to_hub: only with --format=hf'):
    export._run(types.SimpleNamespace(**{**flags, 'format': 'jax', 'push_to_hub': 'me/x'}))  # pylint: disable=protected-access


def cache_maze_dataset(hf_home, repo_id, size, counts, seed=0):
  """A maze dataset in the Hub's row format (parquet: `image` as the Image
  feature's PNG bytes, `solution_path` the moves), cached as the library
  caches dataset repos; returns the pictures by split."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from ctm_jax.data import mazes  # pylint: disable=g-import-not-at-top

  pa = extras.module('pyarrow', 'the Hub tests')
  parquet = extras.module('pyarrow.parquet', 'the Hub tests')
  snapshot = hf_home / 'hub' / f'datasets--{repo_id.replace("/", "--")}' / 'snapshots' / COMMIT
  (snapshot / 'data').mkdir(parents=True)
  (snapshot.parents[1] / 'refs').mkdir()
  (snapshot.parents[1] / 'refs' / 'main').write_text(COMMIT)
  rng = np.random.default_rng(seed)
  pictures = {}
  for split, count in counts.items():
    rows = {'image': [], 'solution_path': []}
    pictures[split] = []
    for i in range(count):
      picture, path = mazes.make_maze(size, rng)
      png = io.BytesIO()
      Image.fromarray(np.round(picture * 255).astype(np.uint8)).save(png, format='PNG')
      rows['image'].append({'bytes': png.getvalue(), 'path': f'{i}.png'})
      rows['solution_path'].append(mazes.directions(path))
      pictures[split].append(picture)
    parquet.write_table(pa.table(rows), str(snapshot / 'data' / f'{split}-00000-of-00001.parquet'))
  return pictures


def test_hub_maze_dataset_reads_as_the_reference_folders_do(offline_hub):
  from ctm_jax.configs import mazes as maze_configs  # pylint: disable=g-import-not-at-top
  from ctm_jax.data import mazes  # pylint: disable=g-import-not-at-top

  pictures = cache_maze_dataset(offline_hub, 'test-org/mazes-tiny', 15, {'train': 5, 'test': 3})
  records = mazes.HubMazes('hf://test-org/mazes-tiny', 'test', 20)
  assert len(records) == 3
  for i, picture in enumerate(pictures['test']):
    np.testing.assert_allclose(records[i]['image'], picture, atol=1 / 255)
    np.testing.assert_array_equal(records[i]['route'], mazes.route_from_image(picture, 20))
  config = maze_configs.get_config('small')  # 11x11
  config.data_dir = 'hf://test-org/mazes-tiny'
  with pytest.raises(ValueError, match=r"config\.image_shape=\(11, 11, 3\).*hf://test-org/mazes-tiny are \(15, 15, 3\).*--config\.image_shape="):
    mazes.check_config(config)
  config.image_shape = (15, 15, 3)
  mazes.check_config(config)
  config.data_dir = 'hf://test-org/mazes-absent'
  with pytest.raises(ValueError, match=r"config\.data_dir='hf://test-org/mazes-absent': .*not in the Hub cache"):
    mazes.check_config(config)


@pytest.mark.slow  # a sharded training run
def test_maze_smoke_trains_on_a_hub_dataset(offline_hub, tmp_path):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ctm_jax import train  # pylint: disable=g-import-not-at-top
  from ctm_jax.configs import mazes as maze_configs  # pylint: disable=g-import-not-at-top

  flags.FLAGS.mark_as_parsed()
  cache_maze_dataset(offline_hub, 'test-org/mazes-tiny', 15, {'train': 40, 'test': 32})
  config = maze_configs.get_config('smoke')
  config.data_dir = 'hf://test-org/mazes-tiny'
  state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(state.step) == config.training_iterations
  records = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert any('train/loss' in r for r in records) and any('eval/acc_most_certain' in r for r in records)
  # evaluate reads the run's Hub data again, as the run did.
  from ctm_jax import evaluate  # pylint: disable=g-import-not-at-top
  scalars = evaluate.evaluate(str(tmp_path / 'run'), n_test_batches=1)
  assert scalars['step'] == config.training_iterations and 0 <= scalars['eval/acc_most_certain'] <= 1


_REFERENCE_DIR = os.environ.get('CTM_REFERENCE_DIR', '')
# Run in the reference's checkout: build its CTM from our config.json (the
# kwargs its constructor takes), materialise the lazy layers with one forward,
# load our model.safetensors with safetensors' load_model(strict=True), predict.
_REFERENCE_LOADS = '''
import inspect, json, sys
import numpy as np, torch, safetensors.torch
from models.ctm import ContinuousThoughtMachine
folder, inputs, out = sys.argv[1:]
kwargs = json.load(open(folder + '/config.json'))
takes = inspect.signature(ContinuousThoughtMachine.__init__).parameters
model = ContinuousThoughtMachine(**{k: v for k, v in kwargs.items() if k in takes})
x = torch.from_numpy(np.load(inputs))
with torch.no_grad():
  model.eval()
  model(x)
  safetensors.torch.load_model(model, folder + '/model.safetensors', strict=True)
  predictions, certainties, _ = model(x)
np.save(out, predictions.numpy())
'''


@pytest.mark.skipif(not _REFERENCE_DIR, reason='set CTM_REFERENCE_DIR to a checkout of SakanaAI/continuous-thought-machines')
@pytest.mark.parametrize('case', ['maze_compact', 'parity', 'image_compact'])
def test_the_reference_loads_our_export_to_our_predictions(case, tmp_path):
  pytest.importorskip('torch')
  from ctm_jax.models import ctm as ctm_lib  # pylint: disable=g-import-not-at-top

  arrays, meta = load_golden(case)  # its kwargs: first-last selection (maze) shares buffers
  model = ctm_lib.ContinuousThoughtMachine(**meta['constructor_kwargs'])
  x_ref = np.random.default_rng(0).standard_normal(arrays['__in__x'].shape).astype(np.float32)
  if case == 'parity':
    x_ref = np.sign(x_ref)
  x = to_jax_layout(x_ref)
  variables = model.init(jax.random.key(3), x)  # our own weights, not the reference's
  variables = {**variables, 'params': ctm_lib.project_decay_params(variables['params'])}
  hub.write_model(str(tmp_path / 'export'), meta['constructor_kwargs'], torch_interop.to_state_dict(variables, model), 'card')
  np.save(tmp_path / 'x.npy', x_ref)
  done = subprocess.run(
      [sys.executable, '-c', _REFERENCE_LOADS, str(tmp_path / 'export'), str(tmp_path / 'x.npy'),
       str(tmp_path / 'predictions.npy')],
      cwd=_REFERENCE_DIR, capture_output=True, text=True, timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  ours = jax.jit(model.apply)(variables, x).predictions
  assert_close(ours, np.load(tmp_path / 'predictions.npy'), what='predictions')


def test_files_that_would_block_or_are_cut_off_are_one_line_or_skipped(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ctm_jax import export  # pylint: disable=g-import-not-at-top

  # A FIFO as --model_kwargs=@FILE or as a folder's config.json would block a read forever.
  os.mkfifo(tmp_path / 'fifo')
  with pytest.raises(ValueError, match=r'--model_kwargs=@.*fifo: .*fifo is not a regular file'):
    hub.parse_model_kwargs(f'@{tmp_path / "fifo"}')
  arrays, meta = load_golden('parity')
  folder = tmp_path / 'repo'
  save_like_the_mixin(folder, arrays, meta)
  os.remove(folder / hub.CONFIG_FILE)
  os.mkfifo(folder / hub.CONFIG_FILE)
  with pytest.raises(ValueError, match=r'config.json: not a regular file'):
    hub.read_model(str(folder))
  with pytest.raises(ValueError, match=r'config.json: not a regular file'):
    hub.read_kwargs(str(folder))
  # A run killed mid-write leaves a cut-off last metrics line: the card keeps the last whole record.
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'metrics.jsonl').write_text(
      json.dumps({'step': 10, 'eval/acc_most_certain': 0.75, 'train/loss': 1.0}) + '\n{"step": 20, "eval/acc')
  config = ml_collections.ConfigDict({'task': 'parity'})
  card = export._model_card(str(run), object(), {'d_model': 8}, config, None)  # pylint: disable=protected-access
  assert '| eval/acc_most_certain | 0.7500 |' in card and '(step 10)' in card


@pytest.mark.parametrize('case', sorted(CASES))
def test_our_export_has_the_layout_the_reference_loads_strictly(case, tmp_path):
  # What load_model(strict=True) checks, without the reference's code: the
  # same names, shapes and dtypes as the reference's own state_dict (the
  # golden's), the shared buffers stored once, as torch reads the file; and
  # our weights, read back, give our predictions.
  torch_safetensors = extras.module('safetensors.torch', 'the torch tier')
  from ctm_jax.models import ctm as ctm_lib  # pylint: disable=g-import-not-at-top

  arrays, meta = load_golden(case)
  kwargs = meta['constructor_kwargs']
  model_class = ctm_jax.tasks.get(CASES[case]).model_class_for('ctm')
  model = model_class(**kwargs)
  x = to_jax_layout(arrays['__in__x'])
  variables = model.init(jax.random.key(5), x)
  variables = {**variables, 'params': ctm_lib.project_decay_params(variables['params'])}
  hub.write_model(str(tmp_path / 'export'), kwargs, torch_interop.to_state_dict(variables, model), 'card')
  loaded = torch_safetensors.load_file(str(tmp_path / 'export' / hub.WEIGHTS_FILE))
  reference = state_dict(arrays, meta)
  shared = {name for name in reference if name.endswith('_right') and kwargs.get('neuron_select_type') == 'first-last'}
  assert sorted(loaded) == sorted(set(reference) - shared)
  for name, tensor in loaded.items():
    assert tuple(tensor.shape) == reference[name].shape and str(tensor.dtype) == f'torch.{reference[name].dtype}', name
  theirs, ours, _ = ctm_jax.from_pretrained(str(tmp_path / 'export'), task=CASES[case])
  assert_close(jax.jit(theirs.apply)(ours, x).predictions, jax.jit(model.apply)(variables, x).predictions)
