"""Shared test fixtures: the reference goldens (../shared/golden, else tests/golden); device markers."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from ctm_jax import extras
from ctm_jax.tools import make_goldens

SHARED = pathlib.Path(
    os.environ.get('CTM_SHARED', pathlib.Path(__file__).resolve().parents[2] / 'shared')
)
GOLDEN = SHARED / 'golden'
# The compact set shipped with the repository (python -m ctm_jax.tools.make_goldens
# --compact); the full set in ../shared/golden wins where it has the case.
REPO_GOLDEN = pathlib.Path(__file__).resolve().parent / 'golden'

# CI's first pass runs README's install (no torch); each test skipped there for
# a module it could not import is listed in this file, and CI runs the list
# again once the extras are installed (.ci/run), so none is skipped for good.
_SKIPPED_LOG = os.environ.get('CTM_SKIPPED_FOR_EXTRAS')


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """A missing extra (ctm_jax.extras.MissingExtra) skips the test, naming the install."""
  outcome = yield
  report = outcome.get_result()
  if call.excinfo is not None and call.excinfo.errisinstance(extras.MissingExtra):
    report.outcome = 'skipped'
    report.longrepr = (str(item.path), item.location[1] or 0, f'Skipped: {call.excinfo.value}')


def pytest_runtest_logreport(report):
  if _SKIPPED_LOG and report.skipped and isinstance(report.longrepr, tuple):
    reason = report.longrepr[2]
    if 'could not import' in reason or 'extra (' in reason or 'not installed' in reason:
      with open(_SKIPPED_LOG, 'a', encoding='utf-8') as f:
        f.write(report.nodeid + '\n')


pytest_collectreport = pytest_runtest_logreport  # a module skipped whole at import


def pytest_collection_modifyitems(items):
  """A test on a golden case that only the full set has is slow-tier: the compact
  set's cases (tests/golden) cover every model class in the default suite."""
  for item in items:
    params = getattr(getattr(item, 'callspec', None), 'params', {})
    for value in params.values():
      if (isinstance(value, str) and not (REPO_GOLDEN / f'{value}.npz').exists()
          and (GOLDEN / f'{value}.npz').exists()):
        item.add_marker(pytest.mark.slow)


needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8,
    reason='needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8',
)


def golden_path(case: str):
  """The directory holding golden `case`: ../shared/golden, else tests/golden; None if neither."""
  for directory in (GOLDEN, REPO_GOLDEN):
    if (directory / f'{case}.npz').exists():
      return directory
  return None


def load_golden(case: str):
  """(arrays, meta) of a golden case; skips the test when no golden set has it."""
  directory = golden_path(case)
  if directory is None:
    pytest.skip(
        f'golden {case!r} is in neither {GOLDEN} (the full set, ../shared beside the repo) nor '
        f'{REPO_GOLDEN} (the compact set); make it with python -m ctm_jax.tools.make_goldens'
    )
  arrays = make_goldens.load_case(directory, case)  # a compact twin's shared state filled in
  meta = json.loads((directory / f'{case}.json').read_text())
  return arrays, meta


def state_dict(arrays, meta):
  return {k: arrays[k] for k in meta['state_dict']}


def to_jax_layout(x: np.ndarray) -> np.ndarray:
  """Reference input (NCHW or (B, C, L)) -> ctm-jax's channels-last layout."""
  if x.ndim == 4:
    return x.transpose(0, 2, 3, 1)
  if x.ndim == 3:
    return x.transpose(0, 2, 1)
  return x


def assert_close(actual, expected, tol=1e-4, what=''):
  """|a - e| <= tol, relative where |e| > 1."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, f'{what}: shape {actual.shape} != {expected.shape}'
  err = np.abs(actual - expected) / np.maximum(1.0, np.abs(expected))
  assert err.max(initial=0.0) <= tol, f'{what}: max error {err.max():.3g} > {tol}'


def one_error_line(output: str, prefix: str = 'ctm_jax.main:') -> str:
  """The one `prefix` line of a command's output, which must hold no traceback."""
  lines = [line for line in output.splitlines() if line.startswith(prefix)]
  assert len(lines) == 1 and 'Traceback' not in output, output[-3000:]
  return lines[0]


def write_artefact(config, out, seed=0, model_and_variables=None):
  """(model, variables) exported to `out`: `config`'s model freshly initialised
  with `seed`, or the given model and variables."""
  from ctm_jax import export  # pylint: disable=g-import-not-at-top
  from ctm_jax import tasks  # pylint: disable=g-import-not-at-top

  if model_and_variables is None:
    task = tasks.get(config.task)
    model = task.make_model(config)
    variables = model.init(jax.random.key(seed), task.model_inputs(task.example_batch(config)))
  else:
    model, variables = model_and_variables
  export.write(model, variables, config, str(out))
  return model, variables
