"""benchmarks/: the analytic FLOP count against JAX's and XLA's, the matmul peak, the tables.

Dimension glossary: B batch, L parity length, H/W/C image height/width/channels,
D neurons, E d_input, K heads, M memory length, H NLM hidden width, P synch
size, N matrix side.
"""

import ast
import inspect
import json
import os
import pathlib
import sys
import time

import chex
import jax
from jax.extend import core as jex_core
import numpy as np
import pytest

from ctm_jax import supervised
from ctm_jax import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import analytic_flops
from benchmarks import harness
from benchmarks import matmul_peak
from benchmarks import model_bench
from benchmarks import reference_adapter

# XLA's count adds elementwise work (norms, activations, softmax, the metrics,
# the optimiser update) to the matmuls the analytic count has; on these small
# models that work is a larger share than on the benchmark's (train: 1.36 and
# 1.09 here; 1.03 for parity_b16, 1.06 for cifar10_b32), hence the upper bound.
RATIO_RANGE = (0.95, 1.5)

# Smoke-size task configs of both kinds (the parity and image smoke configs,
# smaller still), covering both synapses (MLP / U-Net), both NLMs (deep /
# shallow), both synch pairings and a positional embedding. Each is a whole
# task config: the benchmark builds the trainer's step from it.
_LENGTH = 8


def parity_config(remat='none'):
  """configs/parity.py:smoke (length 8, quantile clipping) with a smaller model."""
  config = model_bench.task_config('parity.py:smoke', 4, remat=remat)
  config.parity_sequence_length = _LENGTH
  config.model.update(
      iterations=3,
      d_model=64,
      d_input=32,
      heads=4,
      n_synch_out=8,
      n_synch_action=8,
      memory_length=5,
      memory_hidden_dims=4,
  )
  return config


def image_config(remat='none', **model_overrides):
  """configs/image.py:smoke (16x16 synthetic images) with CIFAR-10's classes and a smaller model."""
  config = model_bench.task_config('image.py:smoke', 2, remat=remat)
  config.num_classes = 10
  config.model.update(
      iterations=3,
      d_model=48,
      d_input=32,
      heads=2,
      n_synch_out=16,
      n_synch_action=16,
      synapse_depth=3,
      memory_length=4,
      deep_nlms=False,
      backbone_type='resnet18-2',
  )
  config.model.update(**model_overrides)
  return config


# The other backbones, positional embeddings and pairings, for the traced count.
VARIANTS = {
    'bottleneck-fourier': dict(
        backbone_type='resnet50-1', positional_embedding_type='learnable-fourier'
    ),
    'multi-fourier-first-last': dict(
        positional_embedding_type='multi-learnable-fourier', neuron_select_type='first-last'
    ),
    'shallow-wide-rotational': dict(
        backbone_type='shallow-wide', positional_embedding_type='custom-rotational'
    ),
    'no-backbone-random': dict(backbone_type='none', neuron_select_type='random'),
}


def _traced(config):
  """Matmul + conv FLOPs of the jaxprs of (forward, the trainer's train step), from shapes."""
  bench = harness.build(config)
  batch = harness.batch_shapes(bench)
  state = bench.run.abstract_state
  with jax.set_mesh(bench.mesh):
    forward = jax.make_jaxpr(model_bench.forward_fn(bench))(
        *model_bench.forward_args(bench, state, batch)
    )
    train_step = harness.train_step(bench).trace(state, batch).jaxpr
  return traced_matmul_flops(forward.jaxpr), traced_matmul_flops(train_step.jaxpr)


def _conv_flops(eqn):
  """2 x the multiply-adds of a conv_general_dilated, padding taps skipped as XLA does."""
  p, dims = eqn.params, eqn.params['dimension_numbers']
  lhs, rhs, out = (v.aval.shape for v in (eqn.invars[0], eqn.invars[1], eqn.outvars[0]))
  taps = 1
  for i in range(len(lhs) - 2):
    size, kernel = lhs[dims.lhs_spec[2 + i]], rhs[dims.rhs_spec[2 + i]]
    outputs = out[dims.out_spec[2 + i]]
    stride, base, window = p['window_strides'][i], p['lhs_dilation'][i], p['rhs_dilation'][i]
    # Position in the dilated, padded input of each (output, tap) pair.
    pos = np.arange(outputs)[:, None] * stride - p['padding'][i][0]
    pos = pos + np.arange(kernel)[None, :] * window
    taps *= int(np.sum((pos % base == 0) & (pos // base >= 0) & (pos // base < size)))
  in_features = lhs[dims.lhs_spec[1]] // p['feature_group_count']
  batch = lhs[dims.lhs_spec[0]] // p['batch_group_count']
  return 2.0 * in_features * out[dims.out_spec[1]] * batch * taps


def traced_matmul_flops(jaxpr):
  """FLOPs of every dot_general and convolution in a jaxpr, scan bodies times their length."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in contracting])
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    assert name not in ('while', 'cond'), f'{name}: trip count or branch unknown'
    repeats = eqn.params['length'] if name == 'scan' else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          total += repeats * traced_matmul_flops(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          total += repeats * traced_matmul_flops(sub)
  return total


@pytest.mark.parametrize(
    'make_config, remat',
    [
        (parity_config, 'none'),
        (parity_config, 'full'),
        (parity_config, 'dots'),
        (parity_config, 'sqrt'),
        (image_config, 'none'),
        (image_config, 'full'),
    ]
    + [(lambda remat, o=o: image_config(remat, **o), 'none') for o in VARIANTS.values()],
    ids=[
        'parity',
        'parity-remat-full',
        'parity-remat-dots',
        'parity-remat-sqrt',
        'image',
        'image-remat-full',
    ]
    + list(VARIANTS),
)
def test_analytic_flops_equal_the_traced_matmuls(make_config, remat):
  """Exactly the matmuls and convolutions of the program JAX hands to XLA.

  Every layer counts here, however small: a missing or wrongly sized one fails.
  The train step is the trainer's (the config's optimiser, clipping, guard and
  metrics add no matmul).
  """
  config = make_config(remat)
  traced_fwd, traced_train = _traced(config)
  spec = model_bench.analytic_spec(config)
  assert analytic_flops.forward_flops(spec) == pytest.approx(traced_fwd, rel=1e-9)
  assert analytic_flops.train_flops(spec, remat) == pytest.approx(traced_train, rel=1e-9)


def _without_clipping(config):
  # The parity config's quantile clip sorts a 1000-norm history per parameter
  # tensor: about a quarter of this tiny model's matmul FLOPs (train ratio 1.61
  # with it, 1.36 without), a negligible share of the benchmark's.
  config.gradient_clipping = -1.0
  return config


@pytest.mark.parametrize(
    'config',
    [_without_clipping(parity_config()), image_config()],
    ids=['parity', 'image'],
)
def test_xla_cost_analysis_over_analytic_in_range(config):
  """XLA's tick-scaled count (model_bench's) adds only elementwise work to the matmuls."""
  forward, train_flops = model_bench.xla_flops(config)
  spec = model_bench.analytic_spec(config)
  forward_ratio = forward / analytic_flops.forward_flops(spec)
  train_ratio = train_flops / analytic_flops.train_flops(spec)
  assert RATIO_RANGE[0] <= forward_ratio <= RATIO_RANGE[1], forward_ratio
  assert RATIO_RANGE[0] <= train_ratio <= RATIO_RANGE[1], train_ratio
  # A count of the forward only would be far out of range.
  assert train_ratio * 3 > RATIO_RANGE[1]


@pytest.mark.slow
def test_benchmark_step_is_the_trainers_step():
  """The benchmark's step is supervised.setup's: the same program on the same state and batch.

  The parity smoke config clips by quantile, so the config's optimiser (not a
  plain AdamW) is in both. The two lowered programs are compared as text (the
  same StableHLO computes the same new state and metrics, bit for bit, from the
  same arguments; a second compile to show it would double the test's time),
  the benchmark's state and batch against the trainer's init and the task's
  synthetic batch, and one step of the benchmark's compiled step runs.
  """
  config = parity_config()
  bench = harness.build(config)
  task = validation.validate(config, num_devices=1)
  model = task.make_model(config)
  local = task.synthetic_batch(config, config.batch_size, harness.BATCH_SEED)
  with jax.set_mesh(bench.mesh):
    run = supervised.setup(config, model, task, bench.mesh)
    shapes = harness.batch_shapes(bench)
    ours = harness.train_step(bench).lower(bench.run.abstract_state, shapes)
    theirs = run.train_step.lower(run.abstract_state, shapes)
    assert ours.as_text() == theirs.as_text()
    batch = harness.device_batch(bench)
    chex.assert_trees_all_equal(jax.device_get(batch), local)
    state = bench.run.init()
    chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(run.init()))
    compiled, _, _ = harness.aot_compile(harness.train_step(bench), state, batch)
    new_state, metrics = compiled(state, batch)
  metrics = jax.device_get(metrics)
  assert {'loss_sum', 'acc_most_certain_sum', 'count', 'grad_norm', 'lr', 'finite', 'loss'} <= set(
      metrics
  )
  assert bool(metrics['finite']) and int(new_state.step) == 1
  # The quantile clip's history recorded this step's norms: the config's optimiser ran.
  assert int(jax.device_get(new_state.opt_state[0]).count) == 1


@pytest.mark.parametrize('name', list(model_bench.CONFIGS))
def test_every_benchmark_config_is_a_task_config(name):
  """Each entry loads, validates on one device, and feeds the analytic count and the reference."""
  args = model_bench.parse_args([f'--configs={name}'])
  config = model_bench.bench_config(name, args)
  _, batch = model_bench.CONFIGS[name]
  assert config.batch_size == batch and config.model.remat == 'none'
  assert config.model.dtype == 'float32'  # the command line's, not imagenet's bf16
  task = validation.validate(config, num_devices=1)
  spec = model_bench.analytic_spec(config)
  assert spec['input_shape'] == task.record_spec(config)['inputs'][0]
  assert analytic_flops.train_flops(spec) > 2 * analytic_flops.forward_flops(spec) > 0
  ref = json.loads(json.dumps(model_bench.reference_spec(config, task)))
  assert ref['task'] == config.task and ref['args']['lr'] == config.lr
  assert ref['model']['out_dims'] == task.model_kwargs(config)['out_dims']
  assert reference_adapter.describe_optimizer(ref['args']).startswith(
      'AdamW' if config.gradient_clipping == -1 else ('autoclip', 'clip_grad_norm_')
  )


# The reference's ContinuousThoughtMachine constructor arguments (models/ctm.py),
# those with defaults last, and its utils/losses.py training losses.
_REFERENCE_CTM_ARGS = (
    'iterations', 'd_model', 'd_input', 'heads', 'n_synch_out', 'n_synch_action',
    'synapse_depth', 'memory_length', 'deep_nlms', 'memory_hidden_dims',
    'do_layernorm_nlm', 'backbone_type', 'positional_embedding_type', 'out_dims',
)  # fmt: skip
_REFERENCE_CTM_DEFAULTS = (
    'prediction_reshaper', 'dropout', 'dropout_nlm', 'neuron_select_type', 'n_random_pairing_self',
)  # fmt: skip
_REFERENCE_LOSSES = ('parity_loss', 'image_classification_loss', 'maze_loss', 'qamnist_loss')


def _reference_with_ctm_signature():
  """A reference_adapter.Reference whose model class has the reference's constructor signature."""
  kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
  params = [inspect.Parameter('self', kind)]
  params += [inspect.Parameter(n, kind) for n in _REFERENCE_CTM_ARGS]
  params += [inspect.Parameter(n, kind, default=None) for n in _REFERENCE_CTM_DEFAULTS]

  class ReferenceCTM:
    def __init__(self, *args, **kwargs):
      del args, kwargs

  ReferenceCTM.__init__.__signature__ = inspect.Signature(params)
  ref = reference_adapter.Reference.__new__(reference_adapter.Reference)
  ref.model_cls = ReferenceCTM
  return ref


@pytest.mark.parametrize('name', list(model_bench.CONFIGS))
@pytest.mark.parametrize('deferred_grads', [False, True])
def test_reference_spec_fits_the_reference_constructor_and_loss(name, deferred_grads):
  """Every benchmark config's spec builds the reference model: our compute options
  (whatever their value) and the baselines' options are left out, nothing the
  reference needs is missing, and the loss is one the reference defines."""
  args = model_bench.parse_args([f'--configs={name}'])
  config = model_bench.bench_config(name, args)
  config.model.deferred_grads = deferred_grads
  task = validation.validate(config, num_devices=1)
  spec = json.loads(json.dumps(model_bench.reference_spec(config, task)))
  kwargs = _reference_with_ctm_signature().model_kwargs(spec['model'])
  assert set(_REFERENCE_CTM_ARGS) <= set(kwargs) <= set(_REFERENCE_CTM_ARGS + _REFERENCE_CTM_DEFAULTS)
  assert kwargs['out_dims'] == spec['model']['out_dims']
  assert spec['loss'] in _REFERENCE_LOSSES


def test_reference_adapter_names_an_argument_the_reference_lacks():
  ref = _reference_with_ctm_signature()
  kwargs = dict.fromkeys(_REFERENCE_CTM_ARGS, 1)
  assert set(ref.model_kwargs(dict(kwargs, num_layers=2, prediction_reshaper=[-1])))
  with pytest.raises(TypeError, match='takes no .*synapse_width'):
    ref.model_kwargs(dict(kwargs, synapse_width=8))
  with pytest.raises(TypeError, match='lacks .*d_input'):
    ref.model_kwargs({k: v for k, v in kwargs.items() if k != 'd_input'})


# A checkout of github.com/SakanaAI/continuous-thought-machines, for the
# reference adapter's test (it also needs torch, and autoclip for the parity
# config's quantile clipping).
REFERENCE_DIR = os.environ.get('CTM_REFERENCE_DIR', '')


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(REFERENCE_DIR, 'models', 'ctm.py')),
    reason='set CTM_REFERENCE_DIR to a checkout of SakanaAI/continuous-thought-machines',
)
@pytest.mark.parametrize(
    'make_config', [parity_config, image_config], ids=['parity-quantile-clip', 'image']
)
def test_reference_worker_runs_the_scripts_step(make_config):
  """The reference's step from the benchmark's spec: same parameter count, a loss near ours."""
  pytest.importorskip('torch')
  config = make_config()
  bench = harness.build(config)
  worker = reference_adapter.ReferenceProcess(
      REFERENCE_DIR,
      model_bench.reference_spec(config, bench.task),
      harness.local_batch(bench),
  )
  try:
    losses = [worker.step() for _ in range(2)]
  finally:
    worker.close()
  with jax.set_mesh(bench.mesh):
    state = bench.run.init()
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    _, metrics = bench.run.train_step(state, harness.device_batch(bench))
  assert worker.n_params == n_params
  assert np.all(np.isfinite(losses))
  assert 0.8 < losses[0] / float(metrics['loss']) < 1.25
  assert worker.optimizer_text == reference_adapter.describe_optimizer(config.to_dict())


def test_analytic_counts_by_hand():
  """The parity smoke model's per-tick matmuls, written out (2 FLOPs per multiply-add)."""
  b, d, e, length = 4, 64, 32, _LENGTH
  p = 8 * 9 // 2  # 'random' pairs: the upper triangle of 8 x 8
  macs_per_example = (
      p * e  # q_proj
      + e * e  # attention_q
      + 2 * length * e  # scores and weighted sum: K heads of width E / K each
      + e * e  # attention_out
      + (e + d) * 2 * d  # depth-1 synapse
      + d * (5 * 8 + 4 * 2)  # deep NLMs: M -> 2H, H -> 2
      + p * 2 * length  # output projector
  )
  per_tick = 2 * b * macs_per_example
  # Positional embedding (once, not per example); kv_proj, attention_k, attention_v.
  once = 2 * length * 2 * e + 2 * b * length * 3 * e * e
  assert analytic_flops.forward_flops(model_bench.analytic_spec(parity_config())) == (
      3 * per_tick + once
  )


def test_conv_taps_skip_padding():
  # 3 outputs of a 3-tap, pad-1 kernel over 3 inputs: 2 + 3 + 2 taps in range.
  assert analytic_flops._conv_taps(3, 3, 1, 1) == (3, 7)  # pylint: disable=protected-access
  assert analytic_flops._conv_taps(4, 1, 2, 0) == (2, 2)  # pylint: disable=protected-access


def test_matmul_peak_measures_each_size():
  peak = matmul_peak.measure('float32', sizes=(64, 128), repeats=2, min_sample_s=0.0)
  assert [s['n'] for s in peak['sizes']] == [64, 128]
  assert peak['peak_flops_per_s'] == max(s['flops_per_s'] for s in peak['sizes']) > 0
  assert 'GFLOP/s' in matmul_peak.describe(peak)


def test_table_columns():
  env = dict(
      device_kind='cpu',
      platform='cpu',
      device_count=1,
      cpu_count=2,
      jax='x',
      jaxlib='x',
      flax='x',
      optax='x',
      date='today',
      git_commit='abc',
      matmul_peak=dict(
          dtype='float32', peak_flops_per_s=2e11, best_n=2048, sizes=[dict(n=2048)], repeats=5
      ),
  )
  result = dict(
      config='parity_b16',
      n_params=1e6,
      forward_lower_s=1.0,
      forward_compile_s=2.0,
      forward_median_s=0.5,
      train_lower_s=1.0,
      train_compile_s=3.0,
      train_median_s=2.0,
      train_memory_analysis=dict(total_bytes=2**30),
      train_flops=1e11,
      train_flops_xla_over_analytic=1.1,
  )
  model_bench.add_rates(result, env['matmul_peak'])
  assert result['achieved_flops_per_s'] == 5e10
  assert result['matmul_peak_fraction'] == 0.25
  args = model_bench.parse_args(['--configs=parity_b16'])
  table = model_bench.format_table(env, [result, dict(config='maze_b16', error='x')], args)
  header, _, row, error = table.splitlines()[-4:]
  assert [c.strip() for c in header.split('|')][-3:] == ['XLA/analytic', 'GFLOP/s', '% peak']
  assert [c.strip() for c in row.split('|')][-4:] == ['100.0', '1.100', '50.0', '25.0']
  assert 'ERROR' in error
  assert 'float32 200.0 GFLOP/s' in table


def test_interleaved_timing_times_the_second_call_of_each_turn():
  """The first call of a turn (slow here, as after a switch) is left out."""
  log = []

  def make_call(name):
    def call():
      first_of_turn = log.count(name) % 2 == 0  # calls come in pairs
      log.append(name)
      if first_of_turn:
        time.sleep(0.05)

    return call

  times = harness.time_interleaved(
      [make_call('a'), make_call('b')], warmup=1, repeats=3, untimed_first=True
  )
  assert ''.join(log) == 'aabbbbaaaabbbbaa'  # turns of two, order alternating
  assert [len(t) for t in times] == [3, 3]
  assert max(max(t) for t in times) < 0.04, times

  def slow():
    time.sleep(0.05)

  assert min(harness.time_interleaved([slow], warmup=0, repeats=2)[0]) >= 0.05


def test_scaling_flags():
  args = model_bench.parse_args(['--scaling', '--memory_ticks=5,15'])
  assert args.remat == 'sqrt' and args.memory_ticks == [5, 15]
  assert args.compile_ticks == [10, 75]
  assert model_bench.parse_args([]).remat == 'none'
  with pytest.raises(SystemExit):
    model_bench.parse_args(['--scaling', '--compile_ticks=10'])
  with pytest.raises(SystemExit):
    model_bench.parse_args(['--configs=parity_b16,nope'])
  args = model_bench.parse_args(['--configs=parity_b16', '--remat=sqrt', '--unroll=2'])
  config = model_bench.bench_config('parity_b16', args, batch=8)
  assert (config.batch_size, config.model.remat, config.model.unroll) == (8, 'sqrt', 2)


def test_data_bench_builds_train_records_as_the_trainer_does(capsys):
  from benchmarks import data_bench

  config = model_bench.task_config('mazes.py:smoke', batch=None)
  assert config.batch_size == 16  # the config's own
  assert data_bench.throughput(config, seconds=0.2) > 10
  data_bench.main(['--seconds=0.2', '--configs=mazes.py:smoke,parity.py:smoke'])
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(('mazes', 'parity'))]
  assert len(rows) == 2 and all(float(row.split('|')[2]) > 0 for row in rows), rows


# ---------------------------------------------------------------------------
# The benchmarks are a package with one harness.

_HARNESS = ('build', 'aot_compile', 'donated_steps', 'time_calls', 'time_interleaved',
            'environment', 'git_commit', 'write_json', 'log')


def _benchmark_sources():
  return {path.name: path.read_text() for path in sorted((pathlib.Path(ROOT) / 'benchmarks').glob('*.py'))}


def _docstrings(tree):
  nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
  return {id(n.body[0].value) for n in nodes
          if n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}


def test_benchmarks_edit_no_sys_path_and_hold_no_scripts_in_strings():
  for name, source in _benchmark_sources().items():
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
      func = getattr(node, 'func', None) if isinstance(node, ast.Call) else None
      if (isinstance(func, ast.Attribute) and func.attr in ('insert', 'append', 'extend')
          and isinstance(func.value, ast.Attribute) and func.value.attr == 'path'
          and getattr(func.value.value, 'id', '') == 'sys'):
        raise AssertionError(f'{name}:{node.lineno} edits sys.path')
      if isinstance(node, ast.Constant) and node.value == '-c':
        raise AssertionError(f'{name}:{node.lineno} runs a script from a string (python -c)')
      if (isinstance(node, ast.Constant) and isinstance(node.value, str) and '\n' in node.value
          and id(node) not in docstrings):
        try:
          code = ast.parse(node.value)
        except SyntaxError:
          continue
        assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(code)), (
            f'{name}:{node.lineno} holds a script in a string'
        )


def test_every_benchmark_takes_its_shared_parts_from_the_harness():
  for name, source in _benchmark_sources().items():
    if name in ('harness.py', '__init__.py'):
      continue
    tree = ast.parse(source)
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert not defined & set(_HARNESS), f'{name} defines its own {sorted(defined & set(_HARNESS))}'


@pytest.mark.slow
def test_time_to_accuracy_stops_each_run_when_its_budget_is_spent(tmp_path):
  from benchmarks import time_to_accuracy  # pylint: disable=g-import-not-at-top

  budget = 30.0
  time_to_accuracy.main([
      '--config=configs/parity.py:smoke', f'--workdir={tmp_path / "tta"}', '--thresholds=2',
      f'--budget={budget}', '--track_every=10', '--override=training_iterations=1000000',
      f'--json={tmp_path / "tta.json"}',
  ])
  result = json.loads((tmp_path / 'tta.json').read_text())
  assert result['budget_s'] == budget
  run = result['runs'][0]
  assert run['returncode'] == 0  # stopped as a user stops it: checkpointed, not killed
  assert run['thresholds'] == {'2.0': None}
  assert run['records'], 'it evaluated before the budget ran out'
  assert budget <= run['wall_s'] < budget + 60
  assert run['records'][-1]['step'] < 1_000_000
  assert any((tmp_path / 'tta' / 'checkpoints').iterdir())
