"""benchmarks/rl_bench.py: our trainer's PPO iteration timed on configs/rl.py:smoke,
the reference's command line and timing records, and (slow, with a checkout)
the reference's training script on the same tiny CartPole config."""

import ast
import importlib.util
import json
import os
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import rl_bench

# A checkout of github.com/SakanaAI/continuous-thought-machines.
REFERENCE_DIR = os.environ.get('CTM_REFERENCE_DIR') or '/tmp/ctm_ref'


@pytest.mark.slow  # a compile and two PPO iterations
def test_ours_on_smoke_config(tmp_path):
  """The whole CLI path without --reference: one row, positive steps/s, the right step count."""
  out = tmp_path / 'rl_bench.json'
  results = rl_bench.main(['--configs=smoke', '--iterations=2', f'--json={out}'])
  (row,) = results
  ours = row['ours']
  assert row['config'] == 'smoke' and row['reference'] is None
  assert row['steps_per_iteration'] == 16 * 8
  assert ours['iterations'] == 2 and len(ours['iteration_s']) == 2
  assert ours['steps'] == 2 * 16 * 8
  assert ours['steps_per_s'] > 0 and ours['compile_s'] > 0
  assert ours['steps_per_s'] == pytest.approx(ours['steps'] / sum(ours['iteration_s']))
  # 16 environments in 2 minibatches of 8: the trainer's mesh over every device (1 or 8 here).
  assert ours['devices'] == jax.device_count()
  saved = json.loads(out.read_text())
  assert saved['results'][0]['ours']['steps'] == ours['steps']
  assert saved['environment']['jax'] == jax.__version__
  table = rl_bench.format_table(saved['environment'], results, rl_bench.parse_args(['--configs=smoke']))
  assert '| smoke | CartPole-v1 | ctm | 16 x 8 |' in table


def test_mesh_falls_back_to_devices_the_minibatches_divide_over():
  config = rl_bench.load_config('acrobot_ctm_2', 1)  # 12 environments, 4 minibatches of 3
  n = rl_bench.mesh_device_count(config)
  assert n == (3 if jax.device_count() >= 3 else 1)
  assert rl_bench.mesh_device_count(config, 1) == 1
  if jax.device_count() >= 2:  # 3 environments per minibatch cannot split over 2 devices
    with pytest.raises(ValueError, match='num_envs'):
      rl_bench.mesh_device_count(config, 2)


def test_reference_flags_map_the_config():
  config = rl_bench.load_config('smoke', 3)
  config.model.deep_nlms = False
  config.target_kl = 0.02
  flags = rl_bench.reference_flags(config, '/logs', '/runs')
  text = ' '.join(flags)
  assert config.total_timesteps == 4 * 16 * 8
  for expected in ('--d_model 16', '--memory_length 4', '--memory_hidden_dims 2', '--no-deep_memory',
                   '--no-do_normalisation', '--env_id CartPole-v1', '--model_type ctm',
                   '--num_envs 16', '--num_steps 8', '--update_epochs 2', '--num_minibatches 2',
                   '--lr 0.001', '--target_kl 0.02', '--seed 1', '--mask_velocity', '--anneal_lr',
                   '--no-clip_vloss', '--total_timesteps 512', '--no-reload', '--device -1',
                   '--log_dir /logs', '--tb_log_dir /runs', f'--track_every {rl_bench.NEVER}'):
    assert expected in text, expected
  assert '--continuous_state_trace' in flags
  config.target_kl = None  # the script's default: no flag
  assert '--target_kl' not in rl_bench.reference_flags(config, '/logs', '/runs')


needs_reference = pytest.mark.skipif(
    not os.path.isfile(os.path.join(REFERENCE_DIR, 'tasks', 'rl', 'train.py')),
    reason=f'no reference checkout at {REFERENCE_DIR} (set CTM_REFERENCE_DIR to a checkout of '
    'SakanaAI/continuous-thought-machines)',
)


@needs_reference
def test_reference_flags_cover_its_parser():
  """Every option of tasks/rl/train.py's parser is passed, and nothing else (read from its source)."""
  with open(os.path.join(REFERENCE_DIR, 'tasks', 'rl', 'train.py')) as f:
    tree = ast.parse(f.read())
  options = {
      node.args[0].value[2:]
      for node in ast.walk(tree)
      if isinstance(node, ast.Call) and getattr(node.func, 'attr', None) == 'add_argument'
  }
  for variant in ('cartpole_ctm_2', 'acrobot_lstm_1', '4rooms_ctm_1'):
    config = rl_bench.load_config(variant, 1)
    config.target_kl = 0.02  # None is left to the script's default
    passed = {
        flag[2:].removeprefix('no-')
        for flag in rl_bench.reference_flags(config, '/logs', '/runs')
        if flag.startswith('--')
    }
    assert passed == options, (variant, passed ^ options)


def test_reference_summary_times_iterations_after_the_warmup():
  """Iterations 0 and 1 (plots, saves) are left out; the window is iterations 2..N+1."""
  config = rl_bench.load_config('smoke', 2)
  batch = 16 * 8
  records = [dict(event='start', t=0.0)]
  t = 0.0
  for i, length in enumerate([10.0, 10.0, 1.0, 3.0]):  # 2 warm-up + 2 timed iterations
    records.append(dict(event='rollout_end', t=t + length / 4, env_s=0.1))
    t += length
    records.append(dict(event='sps', t=t, step=(i + 1) * batch, sps=1.0))
  summary = rl_bench.reference_summary(records, config, 2)
  assert summary['steps'] == 2 * batch
  assert summary['seconds'] == pytest.approx(4.0)
  assert summary['steps_per_s'] == pytest.approx(2 * batch / 4.0)
  assert summary['iteration_s'] == pytest.approx([1.0, 3.0])
  assert summary['split']['rollout_s'] == pytest.approx([0.25, 0.75])
  assert summary['split']['update_s'] == pytest.approx([0.75, 2.25])
  assert summary['warmup_s'] == pytest.approx(20.0)
  with pytest.raises(RuntimeError, match='expected 4'):
    rl_bench.reference_summary(records[:-1], config, 2)


@pytest.mark.slow
@needs_reference
@pytest.mark.skipif(
    importlib.util.find_spec('torch') is None, reason='the reference needs torch, not installed'
)
def test_reference_script_on_tiny_cartpole():
  """The reference's tasks/rl/train.py on smoke sizes (d_model 16, 16 envs x 8 steps), 3 timed
  iterations: positive steps/s over exactly those. Its 80-neuron plot fails at d_model 16,
  so --reference_plots=auto skips the plots."""
  config = rl_bench.load_config('smoke', 3)
  result = rl_bench.bench_reference(config, 3, REFERENCE_DIR, threads=2)
  assert result['steps'] == 3 * 16 * 8
  assert result['steps_per_s'] > 0
  assert len(result['iteration_s']) == 3
  assert len(result['split']['rollout_s']) == 3
  assert result['saves'] == 2  # iterations 0 and 1 only
  assert result['plot_errors'] and result['plots'] == 0
