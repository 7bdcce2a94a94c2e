"""The community's brackets and tracking checkpoints through the generic import.

Their files on the Hub (`vincentoh/ctm-experiments`) are `{'model_state_dict':
...}` with kwargs on the model card (docs/import.md). These tests stand in a
checkpoint of that form written from our own model, under the reference's
key names (`to_state_dict`), and check that `--task=... --model_kwargs=...`
imports it to the same predictions, that an input side under other names is
named (strict) or left at initialisation and listed (--strict=false), and
that the import's CTM core starts a run (`init_from_parts=core`).
"""

import importlib
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from ctm_jax import predict
from ctm_jax import tasks
from ctm_jax import validation
from ctm_jax.interop import torch as torch_interop
from ctm_jax.models import ctm as ctm_lib

torch = pytest.importorskip('torch')

CASES = {'brackets': ('brackets', 'smoke'), 'object_tracking': ('tracking', 'quadrant_smoke')}


def _config(task_name):
  module, variant = CASES[task_name]
  return importlib.import_module(f'ctm_jax.configs.{module}').get_config(variant)


def _community_checkpoint(task_name, path, rename=None):
  """(card kwargs, variables, batch): a checkpoint saved as the community's are."""
  config = _config(task_name)
  task = tasks.get(task_name)
  model = task.make_model(config)
  batch = task.synthetic_batch(config, 4, 0)
  variables = model.init(jax.random.key(7), batch['inputs'])
  state_dict = torch_interop.to_state_dict(variables, model)
  for old, new in (rename or {}).items():
    state_dict[new] = state_dict.pop(old)
  torch.save({'model_state_dict': {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}}, path)
  fields = {f for f in type(model).__dataclass_fields__ if f not in ('parent', 'name')}
  kwargs = {k: v for k, v in task.model_kwargs(config).items() if k in fields and k not in ctm_lib.COMPUTE_FIELDS}
  kwargs['prediction_reshaper'] = list(kwargs['prediction_reshaper'])
  return kwargs, model, variables, batch


@pytest.mark.parametrize('task_name', sorted(CASES))
def test_a_community_checkpoint_imports_with_the_card_kwargs(task_name, tmp_path):
  ckpt = tmp_path / 'community.pt'
  kwargs, model, variables, batch = _community_checkpoint(task_name, ckpt)
  with pytest.raises(ValueError, match='saved no args; give the constructor kwargs with --model_kwargs'):
    torch_interop.import_checkpoint(str(ckpt), str(tmp_path / 'refused'), task=task_name)
  config = torch_interop.import_checkpoint(str(ckpt), str(tmp_path / 'imported'), task=task_name,
                                           model_kwargs=kwargs)
  assert config['task'] == task_name and config['skipped'] == []
  imported, imported_variables, _ = torch_interop.load_imported(str(tmp_path / 'imported'))
  assert type(imported) is type(model)
  want = model.apply(variables, batch['inputs']).predictions
  got = imported.apply(imported_variables, batch['inputs']).predictions
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  # predict: an import records no data settings, so text is refused in one
  # line; the model's own input as a .npy is answered as the model answers it.
  text = {'brackets': '(()[])', 'object_tracking': '1 2 1 0'}[task_name]
  with pytest.raises(ValueError, match=r'an imported .* model records no .*; give a .npy'):
    predict.predict(str(tmp_path / 'imported'), text)
  np.save(tmp_path / 'x.npy', np.asarray(batch['inputs'][0]))
  rows, summary = predict.predict(str(tmp_path / 'imported'), str(tmp_path / 'x.npy'))
  assert len(rows) == model.iterations
  probs = np.asarray(jax.nn.softmax(want[0, :, -1]))
  assert f'(p {probs.max():.3f})' in rows[-1][2], rows[-1]


def test_an_input_side_under_other_names_is_named_or_left_at_init(tmp_path):
  """A checkpoint whose token embedding is not ours: strict names the keys;
  --strict=false loads the rest and lists them; its core then starts a run."""
  ckpt = tmp_path / 'community.pt'
  rename = {'embedding.weight': 'token_embedding.weight', 'embedding.bias': 'token_embedding.bias'}
  kwargs, model, variables, _ = _community_checkpoint('brackets', ckpt, rename)
  with pytest.raises(torch_interop.StateDictMismatch,
                     match=r'(?s)unknown keys \(2\): token_embedding.weight.*token_embedding.bias.*missing variables \(2\)'):
    torch_interop.import_checkpoint(str(ckpt), str(tmp_path / 'strict'), task='brackets', model_kwargs=kwargs)
  assert not (tmp_path / 'strict').exists()
  kwargs_file = tmp_path / 'kwargs.json'
  kwargs_file.write_text(json.dumps(kwargs))
  proc = subprocess.run(
      [sys.executable, '-m', 'ctm_jax.interop.torch', f'--checkpoint={ckpt}', f'--workdir={tmp_path / "loose"}',
       '--task=brackets', f'--model_kwargs=@{kwargs_file}', '--strict=false'],
      capture_output=True, text=True, timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'ignored key token_embedding.weight' in proc.stdout
  assert 'missing, left at initialisation: params/embedding/kernel' in proc.stdout, proc.stdout
  _, loaded, _ = torch_interop.load_imported(str(tmp_path / 'loose'))
  assert loaded['params']['embedding']['kernel'].shape == variables['params']['embedding']['kernel'].shape
  flat_loaded = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    name = jax.tree_util.keystr(path)
    if 'embedding' in name and 'positional' not in name:
      assert not np.array_equal(flat_loaded[path], leaf), name
    else:
      np.testing.assert_array_equal(flat_loaded[path], leaf, err_msg=name)
  # Its core starts a brackets run of the same core (the input side and head afresh).
  config = _config('brackets')
  config.init_from = str(tmp_path / 'loose')
  config.init_from_parts = 'core'
  validation.validate(config)
  config.model.d_model = config.model.d_model * 2
  with pytest.raises(ValueError, match=r'd_model \(source 32, configured 64\)'):
    validation.validate(config)
