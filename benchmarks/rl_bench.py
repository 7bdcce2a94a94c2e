"""Environment steps per second of PPO training (rollout + update): ours against the reference's script.

Usage (from the repo root):
  python -m benchmarks.rl_bench --configs=cartpole_ctm_2,acrobot_ctm_2 --iterations=3
  python -m benchmarks.rl_bench --configs=cartpole_small --iterations=3 \
      --reference=/path/to/continuous-thought-machines --json=/tmp/rl_bench.json

Configs (--configs): variants of configs/rl.py (`get_config(variant)`: the
reference's RL scripts key for key, the small variants, smoke). Each is run
twice, one after the other, never at the same time:

  ours       the trainer's own jitted PPO iteration (the task's `loop_setup`
             on the config's mesh, state donated): one rollout of num_envs x
             num_steps environment steps (agent, environments and reward
             normalisation on device) and its update_epochs x num_minibatches
             updates. The iteration is compiled ahead of time (lower +
             compile: 'ours compile s'), run once untimed (warm-up), then
             --iterations times, each blocked until its runner and metrics
             are ready (the trainer reads every iteration's metrics too).
             steps/s = iterations x num_envs x num_steps / their wall time.
             The mesh is the trainer's (config.mesh over all devices) when
             the config's minibatches divide over them, else the most devices
             that they divide over (--devices picks a count).
  reference  with --reference=DIR, a local checkout of
             github.com/SakanaAI/continuous-thought-machines: its PPO script
             tasks/rl/train.py, run from DIR in a subprocess with every
             option it takes from our config (`reference_flags`: model,
             environment, PPO, seed) and --total_timesteps of --iterations + 1
             iterations of num_envs x num_steps. Its loop runs iterations
             0..total_timesteps // batch inclusive, i.e. --iterations + 2 of
             them, of which 0 and 1 are warm-up: both plot an evaluation
             episode and save a checkpoint (0 % track_every == 0; --track_every
             and --save_every are set beyond the run so that no later
             iteration does). The timed window runs from the end of
             iteration 1 to the end of the last, read from the wall-clock
             times at which the script writes `charts/SPS` (once per
             iteration, last thing in it): steps/s = the global_step gained
             over that window / its seconds. Its start-up (imports, the
             vector environments, the plot before training) is outside the
             window, as is its own `charts/SPS`, which averages from the
             start.
  speed-up   ours steps/s / the reference's: above 1, ours is faster.

How the reference runs (benchmarks/rl_reference_runner.py, in a process of
its own; nothing of the reference is part of this project): DIR goes first
on its PYTHONPATH, `tasks.rl.train` is imported and its `if __name__ ==
"__main__":` body executed in that module with the flags as sys.argv, after:
  - torch.set_num_threads(--threads) (also OMP/MKL_NUM_THREADS); XLA's CPU
    client, for ours, uses every core of this process's affinity mask, so
    with the default --threads (that count) both use the same cores;
  - its SummaryWriter (torch.utils.tensorboard) replaced by tensorboardX's,
    which writes the same event files (torch's needs the tensorboard package),
    or by one that writes nothing where neither is installed; either way it
    records the wall time of each `charts/SPS` write. The script logs every
    parameter's gradient norm after every minibatch: that logging stays in
    the timed loop, as it is part of the script's iteration;
  - modules that only other tasks' plotting imports (cv2, umap; imported by
    tasks/image_classification/plotting.py, not called by the RL script)
    replaced, where missing, by stubs that fail when used;
  - `plot_activations` (the evaluation episode and neuron plot, whose gif is
    drawn in a child process) wrapped by --reference_plots: 'run' runs it and
    waits for the gif's process, so that drawing cannot overlap the timed
    window; 'auto' (default) does that, but where the plot fails (the script
    plots 80 neurons and so fails below d_model 80; missing plot packages) it
    records the error and skips the later plots; 'skip' never plots;
  - a timer around its vector environment's step (gymnasium SyncVectorEnv)
    and a mark at `agent.get_value` (called once per iteration, when the
    rollout is done), which split each timed iteration into rollout (of it:
    environment steps) and update (GAE, minibatch updates with their
    gradient-norm logging, the SPS write), reported in a second table.

The machine line gives the CPU model and cores, jax, torch, the git commit
and the date, and the load average before and after (another process on the
same cores slows both sides; the two run at different times, so the load
need not hit them alike).
"""

import argparse
import importlib.metadata
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import jax

from ctm_jax import hostmem
from ctm_jax import sharding
from ctm_jax import tasks
from ctm_jax import validation

from benchmarks import harness

DEFAULT_CONFIGS = 'cartpole_ctm_2,acrobot_ctm_2'
# The reference's loop iterations before the timed window: 0 and 1 both plot and save.
REFERENCE_WARMUP_ITERATIONS = 2
# --track_every / --save_every for the reference: beyond any run here.
NEVER = 10**9
# The configs benchmarked: configs/rl.py.
CONFIG_MODULE = 'ctm_jax.configs.rl'

# Our config's keys -> the reference script's argparse names, for every option
# of tasks/rl/train.py that the config holds (`config_value`: under config.model
# or at the top level).
log = harness.log


# ---------------------------------------------------------------------------
# Configs.


def _configs():
  """The config file's module (configs/rl.py, installed as ctm_jax.configs)."""
  return importlib.import_module(CONFIG_MODULE)


def task_of(config):
  return tasks.get(config.task)


def load_config(variant, iterations):
  """The config file's `variant`, its total_timesteps covering the reference's
  run (--iterations + 2 iterations: two of warm-up; it sets only the
  learning-rate annealing's horizon, the same on both sides)."""
  module = _configs()
  if variant not in module.VARIANTS:
    raise ValueError(f'unknown config {variant!r}; expected one of {", ".join(module.VARIANTS)}')
  config = module.get_config(variant)
  set_total_timesteps(config, iterations)
  return config


def set_total_timesteps(config, iterations):
  return task_of(config).with_iterations(config, iterations + 2)


def steps_per_iteration(config) -> int:
  return task_of(config).env_steps_per_iteration(config)


def reference_flags(config, log_dir, tb_log_dir) -> list[str]:
  """The reference script's command line for `config`: every option it takes
  from the config (the task's `reference_script_flags`), then the run's own
  (no plots or saves after warm-up, logging, no reload, CPU)."""
  flags = task_of(config).reference_script_flags(config)
  flags += ['--track_every', str(NEVER), '--save_every', str(NEVER)]
  flags += ['--log_dir', log_dir, '--tb_log_dir', tb_log_dir, '--run_name', 'rl_bench']
  flags += ['--no-reload', '--device', '-1']
  return flags


def reference_script(config) -> str:
  return task_of(config).reference_script


# ---------------------------------------------------------------------------
# Ours.


def mesh_device_count(config, requested=0) -> int:
  """`requested` devices (checked), or by default all devices when the
  config's minibatches divide over them, else the most that they divide over."""
  available = jax.device_count()
  task = task_of(config)

  def fits(n):
    try:
      task.validate_mesh(config, sharding.validate(config, n))
    except ValueError:
      return False
    return True

  if requested:
    if requested > available:
      raise ValueError(f'--devices={requested}: only {available} devices')
    task.validate_mesh(config, sharding.validate(config, requested))  # raises naming the field
    return requested
  for n in range(available, 0, -1):
    if fits(n):
      return n
  raise ValueError('the config fits no mesh over these devices')


def bench_ours(config, iterations, devices=0) -> dict:
  """The trainer's jitted iteration: compile time, then `iterations` timed iterations."""
  n_devices = mesh_device_count(config, devices)
  task = validation.validate(config, num_devices=n_devices)
  agent = task.make_model(config)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:n_devices])
  with jax.set_mesh(mesh):
    init, iteration, abstract = task.loop_setup(config, agent, mesh)
    t0 = time.perf_counter()
    runner = jax.block_until_ready(init())
    init_s = time.perf_counter() - t0
    compiled, lower_s, compile_s = harness.aot_compile(iteration, abstract)

    def one(runner):
      runner, metrics = compiled(runner)
      metrics = jax.device_get(metrics)
      if not metrics['finite']:
        raise FloatingPointError('non-finite PPO loss or gradient in the benchmark run')
      return jax.block_until_ready(runner), metrics

    t0 = time.perf_counter()
    runner, _ = one(runner)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(iterations):
      t0 = time.perf_counter()
      runner, metrics = one(runner)
      times.append(time.perf_counter() - t0)
  steps = iterations * steps_per_iteration(config)
  seconds = sum(times)
  return dict(
      devices=n_devices,
      mesh=dict(mesh.shape),
      iterations=iterations,
      steps=steps,
      seconds=seconds,
      steps_per_s=steps / seconds,
      iteration_s=times,
      init_s=init_s,
      lower_s=lower_s,
      compile_s=lower_s + compile_s,
      warmup_iteration_s=warmup_s,
      last_loss=float(metrics['train/loss']),
  )


# ---------------------------------------------------------------------------
# The reference.

# The reference's runner: benchmarks/rl_reference_runner.py, run with DIR as its
# working directory and first on its PYTHONPATH.
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'rl_reference_runner.py')



def reference_commit(ref_dir):
  try:
    return subprocess.run(
        ['git', '-C', ref_dir, 'rev-parse', '--short', 'HEAD'],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def read_records(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def reference_summary(records, config, iterations) -> dict:
  """Steps/s over the timed iterations and their split, from the runner's records."""
  batch = steps_per_iteration(config)
  sps = [r for r in records if r['event'] == 'sps']
  expected = iterations + REFERENCE_WARMUP_ITERATIONS
  if len(sps) != expected:
    raise RuntimeError(f'the reference logged charts/SPS {len(sps)} times; expected {expected}')
  steps = [r['step'] for r in sps]
  if steps != [batch * (i + 1) for i in range(expected)]:
    raise RuntimeError(f'the reference logged charts/SPS at global steps {steps}')
  first, last = sps[REFERENCE_WARMUP_ITERATIONS - 1], sps[-1]
  seconds = last['t'] - first['t']
  gained = last['step'] - first['step']
  boundaries = [r['t'] for r in sps]
  iteration_s = [b - a for a, b in zip(boundaries[REFERENCE_WARMUP_ITERATIONS - 1:-1],
                                       boundaries[REFERENCE_WARMUP_ITERATIONS:])]
  # One rollout_end per iteration, between the previous iteration's SPS write and its own.
  rollout_ends = [r for r in records if r['event'] == 'rollout_end']
  split = None
  if len(rollout_ends) == expected:
    timed = range(REFERENCE_WARMUP_ITERATIONS, expected)
    rollout = [rollout_ends[i]['t'] - sps[i - 1]['t'] for i in timed]
    env = [rollout_ends[i]['env_s'] for i in timed]
    update = [sps[i]['t'] - rollout_ends[i]['t'] for i in timed]
    split = dict(rollout_s=rollout, env_step_s=env, update_s=update)
  start = next((r['t'] for r in records if r['event'] == 'start'), None)
  plots = [r for r in records if r['event'] == 'plot']
  saves = [r for r in records if r['event'] == 'save']
  errors = [r['error'] for r in records if r['event'] == 'plot_error']
  torch_info = next((r for r in records if r['event'] == 'torch'), {})
  return dict(
      iterations=iterations,
      steps=gained,
      seconds=seconds,
      steps_per_s=gained / seconds,
      iteration_s=iteration_s,
      split=split,
      warmup_s=first['t'] - start if start is not None else None,
      own_sps_last=last['sps'],
      plots=len([p for p in plots if not p['skipped']]),
      plot_s=sum(p['s'] for p in plots),
      plot_errors=errors,
      saves=len(saves),
      save_s=sum(s['s'] for s in saves),
      stubs=[r['module'] for r in records if r['event'] == 'stub'],
      writer=next((r['kind'] for r in records if r['event'] == 'writer'), None),
      torch=torch_info.get('version'),
      torch_threads=torch_info.get('threads'),
  )


def bench_reference(config, iterations, ref_dir, threads, plots='auto', timeout=None) -> dict:
  """The reference's training script on `config` (its total_timesteps as
  `set_total_timesteps` leaves it): steps/s over iterations 2.. (see the module doc)."""
  ref_dir = os.path.abspath(ref_dir)
  if not os.path.isfile(os.path.join(ref_dir, reference_script(config))):
    raise FileNotFoundError(
        f'--reference={ref_dir}: no {reference_script(config)} there; expected a checkout of '
        'github.com/SakanaAI/continuous-thought-machines'
    )
  with tempfile.TemporaryDirectory(prefix='rl_bench_') as tmp:
    runner = RUNNER
    records_path = os.path.join(tmp, 'records.jsonl')
    flags = reference_flags(config, os.path.join(tmp, 'logs'), os.path.join(tmp, 'runs'))
    command = [sys.executable, runner, ref_dir, reference_script(config), records_path,
               str(threads), plots, *flags]
    env = hostmem.environ_before_reexec()
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MPLBACKEND='Agg',
               PYTHONPATH=ref_dir)
    log(f'reference: cd {ref_dir} && python -m tasks.rl.train {shlex.join(flags)}')
    log_path = os.path.join(tmp, 'output.log')
    t0 = time.perf_counter()
    with open(log_path, 'w') as out:
      proc = subprocess.run(command, cwd=ref_dir, stdout=out, stderr=subprocess.STDOUT,
                            env=env, timeout=timeout, check=False)
    wall_s = time.perf_counter() - t0
    if proc.returncode:
      with open(log_path) as f:
        tail = f.read()[-4000:]
      raise RuntimeError(f'the reference exited with {proc.returncode}; its output ends:\n{tail}')
    result = reference_summary(read_records(records_path), config, iterations)
  result.update(wall_s=wall_s, flags=flags)
  return result


# ---------------------------------------------------------------------------
# The run.


def run_config(name, args) -> dict:
  config = load_config(name, args.iterations)
  row = dict(
      config=name,
      **task_of(config).describe_run(config),
      steps_per_iteration=steps_per_iteration(config),
      model_options=config.model.to_dict(),
  )
  log(f"{name}: ours, {args.iterations} iterations of {row['batch']} steps")
  row['ours'] = bench_ours(config, args.iterations, args.devices)
  log(f"{name}: ours {row['ours']['steps_per_s']:.0f} steps/s "
      f"(compile {row['ours']['compile_s']:.1f} s, {row['ours']['devices']} device(s))")
  row['reference'] = None
  if args.reference:
    row['reference'] = bench_reference(
        config, args.iterations, args.reference, args.threads, args.reference_plots,
        args.reference_timeout or None,
    )
    row['speedup'] = row['ours']['steps_per_s'] / row['reference']['steps_per_s']
    log(f"{name}: reference {row['reference']['steps_per_s']:.0f} steps/s")
  return row


def _version(package):
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def environment_with_reference(args) -> dict:
  """The harness's record of the machine, with the reference side's."""
  return dict(
      harness.environment(),
      torch=_version('torch'),
      gymnasium=_version('gymnasium'),
      torch_threads=args.threads,
      xla_cpu_threads='all cores of the affinity mask',
      reference=dict(dir=os.path.abspath(args.reference), commit=reference_commit(args.reference))
      if args.reference else None,
      load_before=os.getloadavg(),
  )


def _fmt(value, spec):
  return '-' if value is None else format(value, spec)


def _markdown(header, rows):
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  return lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]


def format_table(env, results, args) -> str:
  ref = env.get('reference')
  lines = [
      f"# RL training throughput (env steps/s, rollout + update) | CPU: {env['cpu']}, "
      f"{env['cpus_usable']} of {env['cpu_count']} cores | jax {env['jax']} "
      f"({env['device_count']} {env['platform']} device(s)) | torch {env['torch']} "
      f"({args.threads} threads) | git {env['git_commit']} | {env['date']}",
      f"# {args.iterations} timed iterations each; load average before "
      f"{env['load_before'][0]:.2f}, after {env.get('load_after', (float('nan'),))[0]:.2f}"
      + (f" | reference {ref['dir']} ({ref['commit']})" if ref else ''),
      '',
  ]
  header = ['config', 'env', 'model', 'envs x steps', 'ours steps/s', 'ours compile s',
            'reference steps/s', 'speed-up']
  rows = []
  for r in results:
    reference = r.get('reference')
    rows.append([
        r['config'], r['env'], r['model'], r['batch'],
        _fmt(r['ours']['steps_per_s'], ',.0f'), _fmt(r['ours']['compile_s'], '.1f'),
        _fmt(reference and reference['steps_per_s'], ',.0f'),
        _fmt(r.get('speedup'), '.1f') + ('x' if r.get('speedup') else ''),
    ])
  lines += _markdown(header, rows)
  split_rows = []
  for r in results:
    reference = r.get('reference')
    if not reference:
      continue
    split = reference['split']
    mean = lambda xs: statistics.fmean(xs) if xs else None
    note = []
    if reference['plot_errors']:
      note.append('plots failed, skipped: ' + reference['plot_errors'][0].split(':')[0])
    elif args.reference_plots == 'skip':
      note.append('plots skipped')
    split_rows.append([
        r['config'],
        _fmt(mean(r['ours']['iteration_s']), '.2f'),
        _fmt(mean(reference['iteration_s']), '.2f'),
        _fmt(split and mean(split['rollout_s']), '.2f'),
        _fmt(split and mean(split['env_step_s']), '.2f'),
        _fmt(split and mean(split['update_s']), '.2f'),
        _fmt(reference['warmup_s'], '.1f'),
        f"{reference['plots']} / {reference['plot_s']:.1f}",
        '; '.join(note) or '-',
    ])
  if split_rows:
    lines += ['', '# Mean seconds per timed iteration; the reference\'s split into rollout (of '
              'it, its vector environment\'s steps) and update; its warm-up s: from its main '
              'body\'s start to the end of iteration 1 (set-up, the plot before training, '
              'iterations 0 and 1 with their plots and saves); its plots: count drawn / '
              'seconds, all in the warm-up', '']
    lines += _markdown(
        ['config', 'ours s/it', 'reference s/it', 'rollout', 'env steps', 'update',
         'ref warm-up s', 'plots', 'note'],
        split_rows,
    )
  return '\n'.join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  p.add_argument('--configs', default=DEFAULT_CONFIGS,
                 help=f'comma-separated variants of configs/rl.py (default {DEFAULT_CONFIGS})')
  p.add_argument('--iterations', type=int, default=3,
                 help='timed PPO iterations per side, after the warm-up ones')
  p.add_argument('--reference', default=None, metavar='DIR',
                 help='a local checkout of github.com/SakanaAI/continuous-thought-machines: '
                 'also run its tasks/rl/train.py on each config and report the speed-up')
  p.add_argument('--json', default=None, help='also write the results (and the environment) here')
  default_threads = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
  p.add_argument('--threads', type=int, default=default_threads or os.cpu_count() or 1,
                 help="the reference's torch threads (default: the cores of this process's "
                 "affinity mask, which XLA's CPU client uses for ours)")
  p.add_argument('--devices', type=int, default=0,
                 help='devices of our mesh (default 0: all, or the most the config divides over)')
  p.add_argument('--reference_plots', default='auto', choices=['auto', 'run', 'skip'],
                 help="the reference's forced plots at start-up and iterations 0 and 1 "
                 '(auto: run them, skip them where they fail)')
  p.add_argument('--reference_timeout', type=float, default=0,
                 help='seconds before a reference run is killed (default 0: none)')
  args = p.parse_args(argv)
  names = [n for n in args.configs.split(',') if n]
  variants = _configs().VARIANTS
  unknown = [n for n in names if n not in variants]
  if not names or unknown:
    p.error(f'--configs: unknown {unknown}; expected some of {list(variants)}')
  if args.iterations < 1:
    p.error('--iterations must be >= 1')
  if args.threads < 1 or args.devices < 0:
    p.error('--threads must be >= 1 and --devices >= 0')
  script = task_of(_configs().get_config()).reference_script
  if args.reference and not os.path.isfile(os.path.join(args.reference, script)):
    p.error(f'--reference={args.reference}: no {script} there')
  args.config_names = names
  return args


def main(argv=None):
  args = parse_args(argv)
  # Cold compiles only: a persistent cache would turn compile times into cache reads.
  jax.config.update('jax_enable_compilation_cache', False)
  env = environment_with_reference(args)
  log(f"configs {args.config_names} on {env['cpu']} ({env['cpus_usable']} cores), "
      f"{env['device_count']} {env['platform']} device(s)")
  results = []
  for name in args.config_names:
    results.append(run_config(name, args))
    if args.json:  # after each config, so a long run keeps partial results
      harness.write_json(args.json, env, args, results=results)
  env['load_after'] = os.getloadavg()
  if args.json:
    harness.write_json(args.json, env, args, results=results)
  print(format_table(env, results, args), flush=True)
  return results


if __name__ == '__main__':
  hostmem.reexec_with_huge_pages()  # as ctm_jax.main does
  main()
