"""The golden sets: tests/golden (compact, shipped) against ../shared/golden and
against ctm_jax/tools/make_goldens.py, which makes both."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import GOLDEN, REPO_GOLDEN
from ctm_jax.tools import make_goldens

REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = make_goldens.all_names(make_goldens.COMPACT)
# Not to outgrow "a few MB": two of the classes (image, FF) carry a ResNet and its gradients.
MAX_SHIPPED_MIB = 6
# The smallest case, for the regeneration check.
SMALL_CASE = 'rl_classic'


def _arrays(path):
  """A case's arrays, whole; no object arrays anywhere (allow_pickle=False)."""
  return make_goldens.load_case(path.parent, path.stem)


def test_compact_set_is_shipped_whole_and_small():
  names = sorted(p.stem for p in REPO_GOLDEN.glob('*.npz'))
  assert names == sorted(SHIPPED)
  assert sorted(p.stem for p in REPO_GOLDEN.glob('*.json')) == names
  size = sum(p.stat().st_size for p in REPO_GOLDEN.iterdir())
  assert size <= MAX_SHIPPED_MIB * 2**20, f'tests/golden holds {size / 2**20:.1f} MiB'


@pytest.mark.parametrize('name', SHIPPED)
def test_shipped_case_is_the_tools_case(name):
  """The json beside each shipped file is what the tool's case table says."""
  meta = json.loads((REPO_GOLDEN / f'{name}.json').read_text())
  arrays = _arrays(REPO_GOLDEN / f'{name}.npz')
  case = make_goldens.CASES[meta['case']]
  assert meta['tag'] == name and meta['perturbed'] == name.endswith(make_goldens.PERTURBED)
  for field in ('variant', 'constructor_kwargs', 'inputs_spec', 'loss'):
    assert meta[field] == case[field], field
  assert json.loads(str(arrays['__config_json__'])) == meta
  assert list(arrays['__state_dict_keys__']) == list(meta['state_dict'])
  assert sorted(k for k in arrays if k not in ('__state_dict_keys__', '__config_json__')) == (
      meta['array_keys']
  )


@pytest.mark.parametrize('name', make_goldens.all_names(make_goldens.FULL))
def test_tools_case_table_matches_shared_goldens(name):
  path = GOLDEN / f'{name}.json'
  if not path.exists():
    pytest.skip(f'{path} not found (the full set, ../shared beside the repo)')
  meta = json.loads(path.read_text())
  case = make_goldens.CASES[meta['case']]
  for field in ('variant', 'constructor_kwargs', 'inputs_spec', 'loss'):
    assert meta[field] == case[field], field


@pytest.mark.parametrize('name', SHIPPED)
def test_shipped_case_equals_shared_case(name):
  """Where ../shared/golden has the case too, the two agree array for array:
  state dicts, inputs and integers exactly, computed floats to 1e-4 (they were
  made on different CPUs)."""
  shared = GOLDEN / f'{name}.npz'
  if not shared.exists():
    pytest.skip(f'{shared} not found' + ('' if GOLDEN.exists() else ' (no ../shared/golden)'))
  problems, _, _ = make_goldens.differences(
      _arrays(REPO_GOLDEN / f'{name}.npz'), _arrays(shared)
  )
  assert not problems, problems


def test_make_goldens_regenerates_a_shipped_case(tmp_path):
  """The tool, run on a reference checkout (env CTM_REFERENCE_DIR), gives the shipped file."""
  reference = os.environ.get('CTM_REFERENCE_DIR')
  if not reference:
    pytest.skip('CTM_REFERENCE_DIR (a checkout of SakanaAI/continuous-thought-machines) not set')
  pytest.importorskip('torch')
  result = subprocess.run(
      [sys.executable, '-m', 'ctm_jax.tools.make_goldens', f'--reference={reference}',
       f'--out={tmp_path}', f'--cases={SMALL_CASE}', f'--compare={REPO_GOLDEN}'],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
  )
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  for name in (SMALL_CASE, SMALL_CASE + make_goldens.PERTURBED):
    problems, _, _ = make_goldens.differences(
        _arrays(tmp_path / f'{name}.npz'), _arrays(REPO_GOLDEN / f'{name}.npz')
    )
    assert not problems, (name, problems)


def test_make_goldens_refuses_a_directory_that_is_no_reference_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'ctm_jax.tools.make_goldens', f'--reference={tmp_path}',
       f'--out={tmp_path / "out"}'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
  )
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    assert lines[0] == "make_goldens needs PyTorch: pip install -e '.[torch]'"
  else:
    assert str(tmp_path) in lines[0]
  assert not (tmp_path / 'out').exists()


def test_unknown_case_is_named():
  with pytest.raises(ValueError, match='no_such_case'):
    make_goldens.selected_cases(['no_such_case'], compact=False)
  assert make_goldens.selected_cases(['parity__perturbed'], compact=True) == ['parity__perturbed']
  assert make_goldens.selected_cases(None, compact=True) == SHIPPED


def _synthetic_case(tag, scale):
  arrays = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.full(3, scale, np.float32),
            '__grad__w': np.ones((2, 3), np.float32) * scale}
  arrays['__state_dict_keys__'] = np.array(['w', 'b'])
  arrays['__config_json__'] = np.array(json.dumps({'tag': tag}))
  return arrays


def test_compact_twin_stores_only_its_changed_state_and_loads_whole(tmp_path):
  plain, perturbed = _synthetic_case('c', 1.0), _synthetic_case('c__perturbed', 2.0)
  make_goldens.write_case(str(tmp_path), 'c', plain, '{}', compact=True)
  make_goldens.write_case(str(tmp_path), 'c__perturbed', perturbed, '{}', compact=True)
  with np.load(tmp_path / 'c__perturbed.npz') as stored:
    assert 'w' not in stored and 'b' in stored  # w is the plain twin's
    assert str(stored[make_goldens.STATE_FROM]) == 'c'
  loaded = make_goldens.load_case(str(tmp_path), 'c__perturbed')
  assert sorted(loaded) == sorted(perturbed)
  for key, value in perturbed.items():
    np.testing.assert_array_equal(loaded[key], value)
  (tmp_path / 'c.npz').unlink()
  with pytest.raises(FileNotFoundError, match='c.npz'):
    make_goldens.load_case(str(tmp_path), 'c__perturbed')


def test_shipped_perturbed_twins_share_their_plain_twins_state():
  for base in make_goldens.COMPACT:
    with np.load(REPO_GOLDEN / f'{base}{make_goldens.PERTURBED}.npz') as stored:
      assert str(stored[make_goldens.STATE_FROM]) == base
      own = set(stored['__state_dict_keys__'].tolist()) & set(stored.files)
      assert own and len(own) < len(stored['__state_dict_keys__']), base
