"""The package as a newcomer installs it: README's commands are what CI runs,
the lean core, bounded dependencies pinned by constraints.txt, the wheel's
contents and metadata, and console scripts equal to the `python -m` forms."""

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

from packaging import requirements
import pytest

import ctm_jax
import lean_install

REPO = pathlib.Path(__file__).resolve().parents[1]


def _ci_module(name):
  """A script of .ci/ (not a package), imported by path."""
  spec = importlib.util.spec_from_file_location(name, REPO / '.ci' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


readme_commands = _ci_module('readme_commands')
check_constraints = _ci_module('check_constraints')

SCRIPTS = {
    'ctm-train': 'ctm_jax.main',
    'ctm-evaluate': 'ctm_jax.evaluate',
    'ctm-predict': 'ctm_jax.predict',
    'ctm-export': 'ctm_jax.export',
    'ctm-import': 'ctm_jax.interop.torch',
}


def _setup_kwargs():
  """setup()'s keyword arguments, read by running setup.py with setup() captured."""
  import setuptools  # pylint: disable=g-import-not-at-top

  captured = {}
  original = setuptools.setup
  setuptools.setup = lambda **kwargs: captured.update(kwargs)
  try:
    source = (REPO / 'setup.py').read_text()
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
      exec(compile(source, 'setup.py', 'exec'), {'__file__': str(REPO / 'setup.py')})  # pylint: disable=exec-used
    finally:
      os.chdir(cwd)
  finally:
    setuptools.setup = original
  return captured


SETUP = _setup_kwargs()


def test_ci_runs_readmes_two_commands_as_written():
  readme = (REPO / 'README.md').read_text()
  commands = readme_commands.commands(readme)
  assert commands['train'].startswith('pip install -e . && python -m ctm_jax.main')
  assert '--xla_force_host_platform_device_count=8' in commands['test']
  assert '-m "not slow"' in commands['test'] and 'pip install -e ".[test]"' in commands['test']
  ci = (REPO / '.ci' / 'run').read_text()
  # CI reads both lines from README and evaluates them; it retypes neither.
  assert 'readme_commands.py train' in ci and 'readme_commands.py test' in ci
  assert 'eval "$TEST_CMD"' in ci and 'eval "$INSTALL"' in ci and 'bash -c "$RUN"' in ci
  code = [line.split(' # ')[0] for line in ci.splitlines() if not line.lstrip().startswith('#')]
  for line in code:
    assert 'not slow"' not in line or '-m "not slow" $(cat' in line, line
    assert 'pip install -q -e ".[all]"' in line or 'pip install -e .' not in line, line
  # The README's test section shows the same test command.
  assert readme.count(commands['test']) >= 2


def test_readme_commands_section_is_checked():
  with pytest.raises(ValueError, match='one-line bash blocks'):
    readme_commands.commands('## The two commands\n\n```bash\npip install .\n```\n\n## Next\n')


def test_python_floor_is_stated_once_everywhere():
  floor = SETUP['python_requires']
  assert floor == '>=3.11'
  readme = (REPO / 'README.md').read_text()
  assert 'Python 3.11+' in readme and 'Python 3.10' not in readme
  assert "v != '$FLOOR'" in (REPO / '.ci' / 'run').read_text()
  assert f'Programming Language :: Python :: {floor[2:]}' in SETUP['classifiers']


def _all_requirements():
  reqs = [requirements.Requirement(r) for r in SETUP['install_requires']]
  for extra in SETUP['extras_require'].values():
    reqs += [requirements.Requirement(r) for r in extra]
  return reqs


# Dependencies with a 1.0+ API that we use lightly; all others are pre-1.0 or
# have broken us, and carry an upper bound.
_UNBOUNDED_OK = {'importlib-resources', 'array-record'}


def test_every_dependency_is_bounded_and_pinned_within_its_bounds():
  pins = check_constraints.pins(str(REPO / 'constraints.txt'))
  for req in _all_requirements():
    name = check_constraints.normalise(req.name)
    ops = {spec.operator for spec in req.specifier}
    assert '>=' in ops, f'{req}: no lower bound'
    assert '<' in ops or name in _UNBOUNDED_OK, f'{req}: no upper bound'
    assert name in pins, f'{req}: not pinned in constraints.txt'
    assert req.specifier.contains(pins[name]), f'constraints.txt pins {name}=={pins[name]}, outside {req}'


def test_extras_are_the_documented_ones_and_the_core_is_lean():
  extras = SETUP['extras_require']
  assert set(extras) == {'rl', 'tfds', 'torch', 'hub', 'gcs', 'notebooks', 'serve', 'browser', 'test', 'all'}
  core = {requirements.Requirement(r).name for r in SETUP['install_requires']}
  for heavy in ('gymnax', 'xminigrid', 'rlax', 'tensorflow-datasets', 'torch', 'huggingface-hub', 'safetensors',
                'gcsfs', 'google-cloud-storage', 'starlette', 'uvicorn', 'playwright'):
    assert heavy not in core
  assert {requirements.Requirement(r).name for r in extras['all']} >= {
      requirements.Requirement(r).name for extra in extras.values() for r in extra}
  # Every module ctm_jax.extras names is installed by the extra of that name.
  from ctm_jax import extras as extras_lib  # pylint: disable=g-import-not-at-top
  dists = {'gymnax': 'gymnax', 'xminigrid': 'xminigrid', 'rlax': 'rlax',
           'tensorflow_datasets': 'tensorflow-datasets', 'torch': 'torch',
           'huggingface_hub': 'huggingface-hub', 'safetensors': 'safetensors', 'pyarrow': 'pyarrow',
           'gcsfs': 'gcsfs', 'starlette': 'starlette', 'uvicorn': 'uvicorn',
           'playwright': 'playwright'}
  for extra, modules in extras_lib.MODULES.items():
    names = {requirements.Requirement(r).name for r in extras[extra]}
    assert {dists[m] for m in modules} <= names, extra


def test_chex_is_used_where_it_is_declared():
  """chex is a core dependency because the package uses it (not only the tests)."""
  used = [p for p in (REPO / 'ctm_jax').rglob('*.py') if re.search(r'^import chex', p.read_text(), re.M)]
  assert used, 'chex is declared in setup.py but ctm_jax never imports it'


def test_a_missing_extra_is_one_line_naming_the_install(tmp_path):
  """With the extras' modules hidden: RL, tfds datasets and PyTorch import refuse in one
  line that names the pip install, before writing anything (training: the slow test below
  and CI's fresh lean venv)."""
  env = lean_install.hidden_extras_env(tmp_path / 'hidden')
  env['CTM_JAX_HUGE_PAGES'] = '0'
  for args, extra in lean_install.REFUSED:
    line = lean_install.check_refused(args, extra, env, tmp_path)
    assert f'pip install "ctm-jax[{extra}]"' in line and f'pip install -e ".[{extra}]"' in line
  lean_install.check_import_refused(env, tmp_path)
  lean_install.check_hub_refused(env, tmp_path)


@pytest.mark.slow
def test_lean_core_trains_parity_digits_and_mazes():
  lean_install.main(hide_extras=True)


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
  out = tmp_path_factory.mktemp('wheel')
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', str(REPO), '-w', str(out)],
                 check=True, capture_output=True)
  (path,) = out.glob('*.whl')
  return zipfile.ZipFile(path)


def test_wheel_holds_the_package_only(wheel):
  names = wheel.namelist()
  top = {name.split('/')[0] for name in names}
  assert top == {'ctm_jax', f'ctm_jax-{ctm_jax.__version__}.dist-info'}, top
  assert 'ctm_jax/py.typed' in names and 'ctm_jax/configs/parity.py' in names
  assert not [n for n in names if re.search(r'(^|/)(tests|docs|benchmarks|notebooks)/', n)]
  assert any(n.endswith('licenses/LICENSE') for n in names)


def test_wheel_metadata(wheel):
  info = f'ctm_jax-{ctm_jax.__version__}.dist-info'
  metadata = wheel.read(f'{info}/METADATA').decode()
  assert f'Version: {ctm_jax.__version__}' in metadata
  assert 'Requires-Python: >=3.11' in metadata
  for field in ('License-Expression: Apache-2.0', 'Keywords:', 'Project-URL: Source',
                'Classifier: Topic :: Scientific/Engineering :: Artificial Intelligence',
                'Description-Content-Type: text/markdown', '## The two commands'):
    assert field in metadata or field.replace('License-Expression', 'License') in metadata, field
  entry_points = wheel.read(f'{info}/entry_points.txt').decode()
  for script, module in SCRIPTS.items():
    assert f'{script} = {module}:run' in entry_points


def test_console_scripts_are_the_python_m_forms(tmp_path):
  """Each installed command and its `python -m` form answer a mistake with the same
  line and exit code (all twenty processes at once: each is mostly imports)."""
  bin_dir = os.path.dirname(sys.executable)
  missing = [s for s in SCRIPTS if shutil.which(s, path=bin_dir) is None]
  if missing:
    pytest.skip(f'{", ".join(missing)} not installed in this venv: pip install -e .')
  env = {**os.environ, 'CTM_JAX_HUGE_PAGES': '0'}
  runs = {}
  for script, module in SCRIPTS.items():
    args = [f'--workdir={tmp_path / script / "missing"}']
    args += {'ctm-train': ['--config=/nonexistent/config.py'], 'ctm-evaluate': [],
             'ctm-predict': ['--input=1010'], 'ctm-export': [f'--out={tmp_path / "out"}'],
             'ctm-import': [f'--checkpoint={tmp_path / "missing.pt"}']}[script]
    for form, command in (('script', [shutil.which(script, path=bin_dir)]),
                          ('module', [sys.executable, '-m', module])):
      runs[script, form] = subprocess.Popen([*command, *args], stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, env=env)
  results = {key: (proc.wait(timeout=300), proc.communicate()[1]) for key, proc in runs.items()}
  last = lambda err: [line for line in err.splitlines() if line.strip()][-1]
  for script in SCRIPTS:
    (code, err), (module_code, module_err) = results[script, 'script'], results[script, 'module']
    assert code == module_code == 2 and 'Traceback' not in err, (script, module_err[-2000:])
    assert last(err) == last(module_err), script
    assert not (tmp_path / script / 'missing').exists()
