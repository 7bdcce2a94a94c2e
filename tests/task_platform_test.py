"""A task defined only here plugs into the trainer with no edit elsewhere.

The fake task has its own data source, a model variant whose keys and values
change every tick (scanned `TickInputs`, as Q&A-MNIST needs), a pytree of
model inputs, a loss with per-example aux, its own train metric, its own
evaluator, and an identity key. It trains (the loss falls), checkpoints,
refuses a workdir whose identity key changed, resumes bit-identically, and
evaluates. A second test checks that modules outside ctm_jax/tasks/, data/
and configs/ name no task and no task key.

Dimension glossary: B batch, T ticks, N tokens per tick, C token features,
K heads, F head width, E d_input.
"""

import ast
import importlib
import io
import json
import os
import pathlib
import re
import shutil
import tokenize

from absl import flags
import chex
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from ctm_jax import checkpoint
from ctm_jax.configs import common
from ctm_jax import evaluate
from ctm_jax.interop import torch as torch_interop
from ctm_jax import losses
from ctm_jax.models import ctm as ctm_lib
from ctm_jax import predict
from ctm_jax import tasks
from ctm_jax import train
from ctm_jax import validation

flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parents[1]


class TokensPerTickCTM(ctm_lib.ContinuousThoughtMachine):
  """A variant that sees a different set of tokens at every tick: keys and
  values are projected once for all ticks, outside the loop, and scanned."""

  @nn.compact
  def __call__(self, inputs, train: bool = False, track: bool = False):
    tokens_BxTxNxC = inputs['tokens'] * inputs['gain'][:, None, None, None]
    batch, ticks = tokens_BxTxNxC.shape[:2]
    kv_BxTxNxE = nn.LayerNorm(name='kv_norm')(nn.Dense(self.d_input, name='kv')(tokens_BxTxNxC))
    k_BTxKxNxF, v_BTxKxNxF = self.project_kv(kv_BxTxNxE.reshape(batch * ticks, -1, self.d_input))

    def per_tick(x_BTxKxNxF):
      return jnp.swapaxes(x_BTxKxNxF.reshape(batch, ticks, *x_BTxKxNxF.shape[1:]), 0, 1)

    synch_params = self.synch_params()
    state = self.initial_state(batch, synch_params)
    scanned = ctm_lib.TickInputs(
        keys_BxKxNxF=per_tick(k_BTxKxNxF), values_BxKxNxF=per_tick(v_BTxKxNxF)
    )
    final, outputs = self.run_ticks(
        state, scanned, ctm_lib.TickInputs(), synch_params, train=train, track=track
    )
    return self.outputs(final, outputs, track)


class TokenSource:
  """Record i: `ticks` sets of noisy tokens whose first token's first feature
  leans towards the label's sign at every tick, so each tick adds evidence."""

  def __init__(self, config, split):
    self.ticks = config.model.iterations
    self.tokens, self.features = config.fake_tokens, config.fake_features
    self.seed, self.split = config.seed, split

  def __len__(self):
    return 512 if self.split == 'eval' else 1 << 20

  def __getitem__(self, index):
    rng = np.random.default_rng([self.seed, self.split == 'eval', int(index)])
    label = np.int32(rng.integers(2))
    tokens_TxNxC = rng.standard_normal((self.ticks, self.tokens, self.features)).astype(np.float32)
    tokens_TxNxC[:, 0, 0] += 2 * label - 1
    return {'tokens': tokens_TxNxC, 'gain': np.float32(1.0), 'targets': label}


class HeldOutMargin:
  """A task's own evaluator: the held-out mean of the task's `margin_B` array,
  and an artefact file."""

  calls: list = []

  def __init__(self, context):
    self.context = context

  def run(self, state, step):
    per_example, _ = self.context.held_out(state, step)
    value = float(per_example['margin_B'].mean())
    with open(os.path.join(self.context.plot_dir, f'margin_{step}.json'), 'w') as f:
      json.dump({'step': step, 'margin': value}, f)
    HeldOutMargin.calls.append(step)
    return {'eval/margin': value}


@tasks.register
class FakeTokens(tasks.Task, tasks.Supervised):
  name = 'fake_tokens_test'
  config_keys = frozenset({'fake_tokens', 'fake_features'})
  identity_keys = ('fake_features',)
  model_class = TokensPerTickCTM

  def validate(self, config):
    if config.fake_tokens < 1:
      raise ValueError(f'config.fake_tokens={config.fake_tokens!r}: must be positive')

  def record_spec(self, config):
    ticks, tokens, features = config.model.iterations, config.fake_tokens, config.fake_features
    return {
        'tokens': ((ticks, tokens, features), np.dtype(np.float32)),
        'gain': ((), np.dtype(np.float32)),
        'targets': ((), np.dtype(np.int32)),
    }

  def train_source(self, config):
    return TokenSource(config, 'train')

  def eval_source(self, config):
    return TokenSource(config, 'eval')

  def model_kwargs(self, config):
    return {**config.model.to_dict(), 'out_dims': 2}

  def model_inputs(self, batch):
    return {'tokens': batch['tokens'], 'gain': batch['gain']}

  def loss(self, config, output, batch):
    loss_BxT = losses.per_tick_cross_entropy(output.predictions, batch['targets'])
    loss, most_certain_B = losses.select_ticks(loss_BxT, output.certainties, config.use_most_certain)
    logits_BxCxT = output.predictions
    rows = jnp.arange(logits_BxCxT.shape[0])
    at_most_certain_BxC = logits_BxCxT[rows, :, most_certain_B]
    # Logit of the label minus the other's, at the most certain tick.
    sign_B = 2.0 * batch['targets'] - 1.0
    margin_B = sign_B * (at_most_certain_BxC[:, 1] - at_most_certain_BxC[:, 0])
    return loss, {'most_certain_B': most_certain_B, 'margin_B': margin_B}

  def correct(self, output, batch):
    return (jnp.argmax(output.predictions, axis=1) == batch['targets'][:, None]).astype(jnp.float32)

  def train_metrics(self, config, output, batch, loss, aux):
    metrics = super().train_metrics(config, output, batch, loss, aux)
    metrics['margin_sum'] = aux['margin_B'].sum()
    return metrics

  def eval_arrays(self, config, output, batch, aux):
    return {**super().eval_arrays(config, output, batch, aux), 'margin_B': aux['margin_B']}

  # The evaluators it offers (config.evals chooses among them) and its default.
  evals = {**tasks.Supervised.evals, 'margin': HeldOutMargin}
  default_evals = ('tick_accuracy', 'margin')


def _config(**overrides):
  config = common.trainer()
  config.task = FakeTokens.name
  config.fake_tokens, config.fake_features = 3, 4
  config.model = common.model(
      iterations=4,
      d_model=32,
      d_input=16,
      heads=2,
      n_synch_out=8,
      n_synch_action=8,
      synapse_depth=1,
      memory_length=3,
      memory_hidden_dims=4,
      backbone_type='none',
  )
  config.update(
      batch_size=32,
      batch_size_test=64,
      n_test_batches=2,
      lr=1e-2,
      warmup_steps=2,
      training_iterations=40,
      save_every=20,
      track_every=20,
      log_every=10,
  )
  config.update(overrides)
  return config


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def fake_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('fake') / 'run'
  HeldOutMargin.calls.clear()
  state = train.train_and_evaluate(_config(), str(workdir))
  return workdir, state


def test_fake_task_trains_and_evaluates(fake_run):
  workdir, state = fake_run
  assert int(state.step) == 40
  records = _records(workdir)
  train_records = [r for r in records if 'train/loss' in r]
  # Its own metric reaches the log, and the loss falls.
  assert all('train/margin' in r for r in train_records)
  assert train_records[-1]['train/loss'] < 0.7 * train_records[0]['train/loss']
  # Its evaluators, and only those, ran at each eval step.
  assert HeldOutMargin.calls == [20, 40]
  evals = [r for r in records if 'eval/margin' in r]
  assert [r['step'] for r in evals] == [20, 40]
  assert not any('eval/adaptive' in key for r in evals for key in r)
  assert evals[-1]['eval/acc_most_certain'] > 0.65  # chance: 0.5
  assert (workdir / 'plots' / 'margin_40.json').exists()
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['20', '40']


def test_fake_task_resumes_bit_identically(fake_run, tmp_path):
  workdir, uninterrupted = fake_run
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(resumed_dir / 'checkpoints' / '40')  # back to step 20
  resumed = train.train_and_evaluate(_config(), str(resumed_dir))
  assert int(resumed.step) == 40
  chex.assert_trees_all_equal(resumed, uninterrupted)


def test_fake_task_refuses_a_changed_identity_key(fake_run):
  workdir, _ = fake_run
  with pytest.raises(checkpoint.IncompatibleWorkdir, match=r'changed: fake_features\)'):
    train.train_and_evaluate(_config(fake_features=5), str(workdir))
  # A key outside the identity (the token count) may change.
  config = _config(fake_tokens=2, training_iterations=41, save_every=41, track_every=41)
  assert int(train.train_and_evaluate(config, str(workdir)).step) == 41


def test_config_evals_chooses_among_the_evaluators_a_task_offers(fake_run, tmp_path):
  task = tasks.get(FakeTokens.name)
  assert task.eval_names(_config()) == ['tick_accuracy', 'margin']
  # 'default' is the task's list, wherever it stands; a name is run once.
  chosen = task.eval_names(_config(evals='margin, default,adaptive_compute'))
  assert chosen == ['margin', 'tick_accuracy', 'adaptive_compute']
  assert task.eval_names(_config(evals='')) == []
  written_before = _config()
  del written_before['evals']  # a run's config.json from before config.evals
  assert task.eval_names(written_before) == ['tick_accuracy', 'margin']
  validation.validate(written_before)
  with pytest.raises(ValueError, match=re.escape(
      "config.evals='default,top5': 'top5' is not an evaluator of task 'fake_tokens_test'; "
      'expected names among default, tick_accuracy, adaptive_compute, margin')):
    validation.validate(_config(evals='default,top5'))
  # Evaluating the trained run with other evaluators runs those, and only those.
  workdir, _ = fake_run
  calls = len(HeldOutMargin.calls)
  scalars = evaluate.evaluate(str(workdir), out=str(tmp_path / 'eval'), evals='adaptive_compute')
  assert any(key.startswith('eval/adaptive') for key in scalars)
  assert 'eval/margin' not in scalars and 'eval/acc_most_certain' not in scalars
  assert len(HeldOutMargin.calls) == calls
  assert 'eval/margin' in evaluate.evaluate(str(workdir), out=str(tmp_path / 'eval2'))


def test_parts_a_task_lacks_are_refused_in_one_line(fake_run):
  workdir, _ = fake_run
  task = tasks.get(FakeTokens.name)
  assert isinstance(task, tasks.Supervised) and isinstance(task, tasks.Evaluated)
  assert not isinstance(task, tasks.Predicts) and not isinstance(task, tasks.ImportsReference)
  with pytest.raises(validation.UsageError, match='reads no single inputs'):
    predict.predict(str(workdir), 'x.npy')
  with pytest.raises(ValueError, match=r'--task=fake_tokens_test: it imports no reference checkpoints'):
    torch_interop.model_kwargs_from_args({'iterations': 4}, FakeTokens.name)
  assert FakeTokens.name not in [t.name for t in tasks.with_part(tasks.ImportsReference)]
  # A task not made by a loss (RL: its own program) chooses no evaluators by config.
  config = importlib.import_module('ctm_jax.configs.rl').get_config()
  config.evals = 'default'
  with pytest.raises(ValueError, match=r"config.evals='default': task 'rl' offers no choice"):
    validation.validate(config)


def test_register_refuses_a_task_without_training_or_with_unknown_default_evals():
  class NoTraining(tasks.Task):
    name = 'no_training_test'

  with pytest.raises(ValueError, match=r'subclass tasks.Supervised, or define training'):
    tasks.register(NoTraining)

  class UnknownDefault(tasks.Task, tasks.Supervised):
    name = 'unknown_default_test'
    default_evals = ('tick_accuracy', 'margin')

  with pytest.raises(ValueError, match=r"default_evals names \['margin'\], which evals lacks"):
    tasks.register(UnknownDefault)
  assert 'no_training_test' not in tasks.names() and 'unknown_default_test' not in tasks.names()


# ---------------------------------------------------------------------------
# Nothing outside the task places names a task or a task key.

_TASK_PLACES = ('ctm_jax/tasks/', 'ctm_jax/data/', 'configs/')
# Regenerates the reference's own golden files, whose cases are named after the
# reference's models and scripts (its tasks), not ours.
_REFERENCE_CASES = ('ctm_jax/tools/make_goldens.py',)
_CHECKED = ('ctm_jax', 'benchmarks')
_LIBRARIES = ('np', 'jnp', 'jax', 'lax', 'numpy')


def _code_words(path):
  """Identifiers and string literals of a Python file, without comments and docstrings."""
  words = set()
  tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
  for i, tok in enumerate(tokens):
    if tok.type == tokenize.NAME:
      # A library's function (`jnp.sort`) is not a task's name.
      if i >= 2 and tokens[i - 1].string == '.' and tokens[i - 2].string in _LIBRARIES:
        continue
      words.add(tok.string)
    elif tok.type == tokenize.STRING:
      previous = tokens[i - 1].type if i else tokenize.NEWLINE
      if previous in (tokenize.INDENT, tokenize.NEWLINE, tokenize.NL, tokenize.DEDENT):
        continue  # a docstring or a bare string statement
      words.add(tok.string.strip('rbfuRBFU').strip('\'"'))
  return words


def test_no_task_names_or_keys_outside_the_task_places():
  builtin = [tasks.get(n) for n in tasks.names() if type(tasks.get(n)).__module__.startswith('ctm_jax.tasks.')]
  forbidden = {task.name for task in builtin} | {key for task in builtin for key in task.config_keys}
  offenders = []
  for root in _CHECKED:
    for path in sorted((REPO / root).rglob('*.py')):
      relative = path.relative_to(REPO).as_posix()
      if relative.startswith(_TASK_PLACES) or relative in _REFERENCE_CASES:
        continue
      if relative.startswith('ctm_jax/tools/') and path.stem.split('_')[0] in tasks.names():
        continue  # a task's own command-line tool, named after it
      found = sorted(_code_words(path) & forbidden)
      if found:
        offenders.append(f'{relative}: {", ".join(found)}')
  assert not offenders, '\n'.join(offenders)


# ---------------------------------------------------------------------------
# Tasks sit below the loop: they hand it a Program and hold no loop plumbing.

_LOOP_MODULES = ('checkpoint', 'writers', 'workdir', 'train')


def _imports(path):
  """(module, name) of every `from X import Y` and (X, '') of every `import X` in a file."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      found += [(node.module, alias.name) for alias in node.names]
    elif isinstance(node, ast.Import):
      found += [(alias.name, '') for alias in node.names]
  return found


def _private_attributes(path, shared_aliases):
  """`alias._name` uses in a file, for the aliases of modules outside tasks/."""
  return sorted(
      f'{node.value.id}.{node.attr}'
      for node in ast.walk(ast.parse(path.read_text()))
      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
      and node.value.id in shared_aliases and node.attr.startswith('_')
      and not node.attr.startswith('__')
  )


def test_tasks_hold_no_loop_plumbing_and_no_private_names_of_shared_modules():
  offenders = []
  for path in sorted((REPO / 'ctm_jax' / 'tasks').rglob('*.py')):
    relative = path.relative_to(REPO).as_posix()
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('ctm_jax'):
        for alias in node.names:
          full = f'{node.module}.{alias.name}'
          if not full.startswith('ctm_jax.tasks'):
            aliases[alias.asname or alias.name] = full
    for module, name in _imports(path):
      full = f'{module}.{name}' if name else module
      if full.removeprefix('ctm_jax.') in _LOOP_MODULES:
        offenders.append(f'{relative} imports {full}')
      if name.startswith('_'):
        offenders.append(f'{relative} imports the private {full}')
    offenders += [f'{relative} uses {a}' for a in _private_attributes(path, aliases)]
  assert not offenders, '\n'.join(offenders)

