"""benchmarks/: the analytic FLOP count against JAX's and XLA's, the matmul peak, the tables.

Dimension glossary: B batch, L parity length, H/W/C image height/width/channels,
D neurons, E d_input, K heads, M memory length, H NLM hidden width, P synch
size, N matrix side.
"""

import os
import sys
import time

import jax
from jax.extend import core as jex_core
import numpy as np
import optax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import analytic_flops
from benchmarks import matmul_peak
from benchmarks import model_bench

# XLA's count adds elementwise work (norms, activations, softmax, the optimiser
# update) to the matmuls the analytic count has; on these small models that
# work is a larger share than on the benchmark's (1.32 and 1.07 here, 1.03 for
# imagenet_b2), hence the upper bound.
RATIO_RANGE = (0.95, 1.5)

# Smoke-size models of both kinds, covering both synapses (MLP / U-Net), both
# NLMs (deep / shallow), both synch pairings and a positional embedding.
_LENGTH = 8
PARITY = model_bench.bench_config(
    'parity',
    4,
    input_shape=(_LENGTH,),
    model_overrides=dict(
        iterations=3,
        d_model=64,
        d_input=32,
        heads=4,
        n_synch_out=8,
        n_synch_action=8,
        memory_length=5,
        memory_hidden_dims=4,
        out_dims=2 * _LENGTH,
        prediction_reshaper=(_LENGTH, 2),
    ),
)
IMAGE = model_bench.bench_config(
    'cifar10',
    2,
    input_shape=(16, 16, 3),
    model_overrides=dict(
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
    ),
    num_classes=10,
)


def _image_variant(**model_overrides):
  return dict(IMAGE, model={**IMAGE['model'], **model_overrides})


# The other backbones, positional embeddings and pairings, for the traced count.
VARIANTS = {
    'bottleneck-fourier': _image_variant(
        backbone_type='resnet50-1', positional_embedding_type='learnable-fourier'
    ),
    'multi-fourier-first-last': _image_variant(
        positional_embedding_type='multi-learnable-fourier', neuron_select_type='first-last'
    ),
    'shallow-wide-rotational': _image_variant(
        backbone_type='shallow-wide', positional_embedding_type='custom-rotational'
    ),
    'no-backbone-random': _image_variant(backbone_type='none', neuron_select_type='random'),
}


def _shapes(cfg, remat):
  """(forward, train step, their abstract arguments) of a config's model."""
  x, targets = jax.eval_shape(lambda key: model_bench.make_batch(cfg, key), jax.random.key(0))
  tx = optax.adamw(1e-4)
  model = model_bench.make_model(cfg, remat, 'float32', 1)
  state = model_bench.state_shapes(model, tx, x)
  forward, train_step = model_bench.build_steps(model, cfg['task'], tx)
  return (forward, (model_bench.forward_variables(state), x)), (train_step, (state, x, targets))


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
    'cfg, remat',
    [
        (PARITY, 'none'),
        (PARITY, 'full'),
        (PARITY, 'dots'),
        (PARITY, 'sqrt'),
        (IMAGE, 'none'),
        (IMAGE, 'full'),
    ]
    + [(cfg, 'none') for cfg in VARIANTS.values()],
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
def test_analytic_flops_equal_the_traced_matmuls(cfg, remat):
  """Exactly the matmuls and convolutions of the program JAX hands to XLA.

  Every layer counts here, however small: a missing or wrongly sized one fails.
  """
  (forward, fwd_args), (train_step, train_args) = _shapes(cfg, remat)
  traced_fwd = traced_matmul_flops(jax.make_jaxpr(forward)(*fwd_args).jaxpr)
  traced_train = traced_matmul_flops(jax.make_jaxpr(train_step)(*train_args).jaxpr)
  assert analytic_flops.forward_flops(cfg) == pytest.approx(traced_fwd, rel=1e-9)
  assert analytic_flops.train_flops(cfg, remat) == pytest.approx(traced_train, rel=1e-9)


@pytest.mark.parametrize('cfg', [PARITY, IMAGE], ids=['parity', 'image'])
def test_xla_cost_analysis_over_analytic_in_range(cfg):
  """XLA's tick-scaled count (model_bench's) adds only elementwise work to the matmuls."""
  forward, train = model_bench.xla_flops(cfg)
  forward_ratio = forward / analytic_flops.forward_flops(cfg)
  train_ratio = train / analytic_flops.train_flops(cfg)
  assert RATIO_RANGE[0] <= forward_ratio <= RATIO_RANGE[1], forward_ratio
  assert RATIO_RANGE[0] <= train_ratio <= RATIO_RANGE[1], train_ratio
  # A count of the forward only would be far out of range.
  assert train_ratio * 3 > RATIO_RANGE[1]


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
  assert analytic_flops.forward_flops(PARITY) == 3 * per_tick + once


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

  times = model_bench.time_interleaved(
      [make_call('a'), make_call('b')], warmup=1, repeats=3, untimed_first=True
  )
  assert ''.join(log) == 'aabbbbaaaabbbbaa'  # turns of two, order alternating
  assert [len(t) for t in times] == [3, 3]
  assert max(max(t) for t in times) < 0.04, times

  def slow():
    time.sleep(0.05)

  assert min(model_bench.time_interleaved([slow], warmup=0, repeats=2)[0]) >= 0.05


def test_scaling_flags():
  args = model_bench.parse_args(['--scaling', '--memory_ticks=5,15'])
  assert args.remat == 'sqrt' and args.memory_ticks == [5, 15]
  assert args.compile_ticks == [10, 75]
  assert model_bench.parse_args([]).remat == 'none'
  with pytest.raises(SystemExit):
    model_bench.parse_args(['--scaling', '--compile_ticks=10'])
