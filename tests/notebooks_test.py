"""The notebooks in notebooks/ run end to end, as a user (or Colab) runs them,
so that they cannot rot: every cell executes without error and the cells'
own checks (the model learned, the export equals the model, early exit equals
the post-hoc table) hold."""

import os
import pathlib

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / 'notebooks'


def _execute(name: str, cwd: pathlib.Path):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  notebook = nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)
  # A user's kernel: one device, whatever the test run forces.
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  client = nbclient.NotebookClient(
      notebook, timeout=900, kernel_name='python3', resources={'metadata': {'path': str(cwd)}}
  )
  client.execute(env=env)
  return notebook


def _text(notebook) -> str:
  out = []
  for cell in notebook.cells:
    for output in cell.get('outputs', []):
      out.append(output.get('text', '') or ''.join(output.get('data', {}).get('text/plain', '')))
  return '\n'.join(out)


def _has_image(notebook, mime: str) -> bool:
  return any(
      mime in output.get('data', {})
      for cell in notebook.cells
      for output in cell.get('outputs', [])
  )


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
  notebook = _execute('quickstart', tmp_path)
  text = _text(notebook)
  assert 'trained in' in text and 'accuracy at the last tick' in text
  assert "gives the trained model's outputs" in text
  assert 'early exit, refill' in text
  assert _has_image(notebook, 'image/png')  # the accuracy/certainty plot
  assert _has_image(notebook, 'image/gif')  # the attention animation
  assert (tmp_path / 'artefacts' / 'digits' / 'forward.jax_export').exists()


@pytest.mark.slow
def test_import_notebook_runs(tmp_path):
  notebook = _execute('import_pytorch', tmp_path)
  text = _text(notebook)
  assert 'imported image_classification CTM' in text
  assert '<- most certain' in text and 'ticks used:' in text
  assert _has_image(notebook, 'image/gif')
  assert (tmp_path / 'artefacts' / 'imported' / 'forward.jax_export').exists()


def test_notebooks_open_in_colab_and_install_themselves():
  nbformat = pytest.importorskip('nbformat')
  for path in sorted(NOTEBOOKS.glob('*.ipynb')):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    first_markdown = notebook.cells[0].source
    assert 'colab.research.google.com/github/' in first_markdown and path.name in first_markdown
    install = notebook.cells[1].source
    assert 'pip' in install and "find_spec('ctm_jax')" in install, path.name
    assert not any(cell.get('outputs') for cell in notebook.cells if cell.cell_type == 'code'), (
        f'{path.name}: commit notebooks without outputs'
    )


@pytest.mark.slow
def test_hub_notebook_runs_on_an_offline_hub_cache(tmp_path, monkeypatch):
  """notebooks/hub.ipynb against a Hub cache built here (no network): a small
  maze CTM under SakanaAI/ctm-maze-large's name (the golden maze case's
  kwargs and weights, saved as the mixin saves them) and 11x11 mazes under
  SakanaAI/mazes-large's, in huggingface_hub's own cache layout."""
  from conftest import load_golden  # pylint: disable=g-import-not-at-top
  import hub_test  # pylint: disable=g-import-not-at-top

  hf_home = tmp_path / 'hf_home'
  arrays, meta = load_golden('maze_compact')
  hub_test.save_like_the_mixin(tmp_path / 'model', arrays, meta)
  hub_test.cache_repo(hf_home, 'SakanaAI/ctm-maze-large', tmp_path / 'model')
  hub_test.cache_maze_dataset(hf_home, 'SakanaAI/mazes-large', 11, {'train': 2, 'test': 6})
  monkeypatch.setenv('HF_HOME', str(hf_home))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  (tmp_path / 'run').mkdir()
  notebook = _execute('hub', tmp_path / 'run')
  text = _text(notebook)
  assert 'mazes CTM: 4 ticks, 40 neurons, routes of 6 moves' in text
  assert '6 held-out mazes of (11, 11, 3); solving 4' in text
  assert 'maze 3: most certain at tick' in text and 'ticks used:' in text
  assert _has_image(notebook, 'image/gif')
