"""ctm_jax/outputs.py: what a command may replace, and the swap that never
replaces a folder another command wrote meanwhile."""

import json
import os

import pytest

from ctm_jax import outputs
from ctm_jax import validation


def _files(root):
  return {
      os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), 'rb').read()
      for d, _, names in os.walk(root) for f in names
  }


def _write_report(folder, value):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'plot.png'), 'w') as f:
    f.write(value)
  with open(os.path.join(folder, 'metrics.json'), 'w') as f:
    json.dump({'value': value}, f)


def test_a_new_folder_is_swapped_in_whole(tmp_path):
  out = str(tmp_path / 'eval')
  with outputs.building(out, 'eval', overwrite=False) as folder:
    assert folder != out and not os.path.exists(out)  # nothing at out until complete
    _write_report(folder, 'a')
  assert _files(out) == {'plot.png': b'a', 'metrics.json': b'{"value": "a"}'}
  assert sorted(os.listdir(tmp_path)) == ['eval']


def test_a_failed_command_leaves_out_as_it_was_and_no_scratch(tmp_path):
  out = str(tmp_path / 'eval')
  _write_report(out, 'old')
  with pytest.raises(RuntimeError):
    with outputs.building(out, 'eval', overwrite=True) as folder:
      _write_report(folder, 'new')
      raise RuntimeError('killed half way')
  assert _files(out)['plot.png'] == b'old'
  assert sorted(os.listdir(tmp_path)) == ['eval']


def test_overwrite_replaces_its_own_kind_leaving_no_stale_files(tmp_path):
  out = str(tmp_path / 'eval')
  _write_report(out, 'old')
  with open(os.path.join(out, 'stale.gif'), 'w') as f:
    f.write('from the older evaluation')
  with outputs.building(out, 'eval', overwrite=True) as folder:
    _write_report(folder, 'new')
  assert _files(out) == {'plot.png': b'new', 'metrics.json': b'{"value": "new"}'}
  assert sorted(os.listdir(tmp_path)) == ['eval']


def test_a_folder_written_there_meanwhile_is_never_replaced(tmp_path):
  # Two commands writing one --out: the second to finish is refused, the first's folder kept.
  out = str(tmp_path / 'export')
  with pytest.raises(validation.UsageError, match=r'--out=.*export: an evaluation appeared there'):
    with outputs.building(out, 'eval', overwrite=False) as folder:
      _write_report(folder, 'second')
      _write_report(out, 'first')  # the other command finishes while this one runs
  assert _files(out)['plot.png'] == b'first'
  assert sorted(os.listdir(tmp_path)) == ['export']


def test_a_replaced_folder_that_became_another_kind_meanwhile_is_kept(tmp_path):
  out = str(tmp_path / 'eval')
  _write_report(out, 'old')
  with pytest.raises(validation.UsageError, match='appeared there'):
    with outputs.building(out, 'eval', overwrite=True) as folder:
      _write_report(folder, 'new')
      os.makedirs(os.path.join(out, 'checkpoints'))  # a trainer started in it
  assert os.path.isdir(os.path.join(out, 'checkpoints'))
  assert _files(out)['plot.png'] == b'old'
  assert sorted(os.listdir(tmp_path)) == ['eval']


@pytest.mark.parametrize('existing,kind,overwrite,named', [
    ('run', 'eval', True, 'a training run (--overwrite never replaces one)'),
    ('foreign', 'artefact', True, 'files no ctm_jax command wrote there'),
    ('eval', 'eval', False, 'pass --overwrite'),
    ('eval', 'artefact', True, '--overwrite replaces only an exported artefact'),
])
def test_claim_refuses_in_one_line(tmp_path, existing, kind, overwrite, named):
  out = tmp_path / 'out'
  out.mkdir()
  marker = {'run': 'metrics.jsonl', 'foreign': 'notes.txt', 'eval': 'metrics.json'}[existing]
  (out / marker).write_text('kept')
  with pytest.raises(validation.UsageError) as raised:
    with outputs.building(str(out), kind, overwrite):
      pytest.fail('claimed')
  assert named in str(raised.value) and '\n' not in str(raised.value)
  assert _files(str(out)) == {marker: b'kept'}
  assert sorted(os.listdir(tmp_path)) == ['out']
