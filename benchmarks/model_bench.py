"""Compile time, step time, memory and FLOPs of the CTM on the reference's configs.

Usage (from the repo root):
  python benchmarks/model_bench.py                        # all configs
  python benchmarks/model_bench.py --configs=parity_b16,cifar10_b32 \
      --repeats=3 --warmup=1 --json=/tmp/bench.json
  python benchmarks/model_bench.py --configs=cifar10_b32 --repeats=3 --warmup=1 \
      --reference=/path/to/continuous-thought-machines  # + PyTorch reference

Per config it builds the model with the reference script's options (the
shared `configs/models.py`, which names each source script), then measures:
  compile    lower + compile of the jitted function (AOT, `jit(f).lower(...)
             .compile()`), timed apart from any execution.
  forward    `apply(train=False)`, jitted; median wall time over --repeats
             calls after --warmup calls, each call blocked until ready.
  train      forward (train=True) + task loss + backward + optax.adamw update
             + decay projection, jitted with the state donated; median as above.
  memory     on GPU/TPU: the device's `memory_stats()['peak_bytes_in_use']`
             (a process-wide high-water mark, so each config runs in its own
             subprocess there; it covers init, forward and train step).
             Elsewhere (CPU): the compiled train step's `memory_analysis()`,
             temp + argument + output - alias bytes (alias = donated buffers
             that the output reuses, which would otherwise be counted twice).
  FLOPs      XLA's HLO cost analysis of the train step (and forward). XLA
             counts a while loop's body once whatever its trip count, so the
             raw `compiled.cost_analysis()['flops']` holds one tick. The table
             scales it: F = F(T=1) + (T - 1) * (F(T=2, unrolled) - F(T=1)),
             from the cost analysis of 1- and 2-tick variants of the same model
             (lowered on CPU, compiled elsewhere); the raw figure is in the JSON.
  ref train  with --reference=DIR, a local checkout of
             github.com/SakanaAI/continuous-thought-machines (imported from DIR
             at run time by `reference_adapter.py`; it needs torch): the
             reference's own train step on the same config, batch and task loss
             (its models/ctm.py and utils/losses.py; zero_grad, forward, loss,
             backward, torch.optim.AdamW step), on the CPU with all cores. It
             is timed interleaved with ours in the same process (rounds of one
             step each, the order alternating), so machine noise hits both
             alike; median over the same --warmup and --repeats. speedup = ref
             median / our train median: above 1, ours is faster. The first
             step's losses of both models (at init) are logged as a check that
             the configs match. The reference always runs in float32.

Dimension glossary: B batch, L parity length, R maze route length,
H/W/C image height/width/channels.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctm_jax import losses
from ctm_jax.models.ctm import ContinuousThoughtMachine
from ctm_jax.models.ctm import project_decay_params
from ctm_jax.tools import flops as flops_lib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import reference_adapter  # pylint: disable=g-import-not-at-top
from configs import models as model_configs  # pylint: disable=g-import-not-at-top


def _bench_config(variant, batch, **extra):
  """A benchmark entry: the shared reference model config at a batch size."""
  config = model_configs.get_config(variant)
  model = config.model.to_dict()
  model['prediction_reshaper'] = tuple(model['prediction_reshaper'])
  return dict(
      source=f'configs/models.py:{variant}',
      task=config.task,
      batch=batch,
      input_shape=tuple(config.input_shape),
      model=model,
      **extra,
  )


CONFIGS = {
    'parity_b16': _bench_config('parity', 16),
    'parity_b64': _bench_config('parity', 64),
    'cifar10_b32': _bench_config('cifar10', 32, num_classes=10),
    'maze_b16': _bench_config('maze', 16, route_length=100),
}


def make_batch(cfg, key):
  """Synthetic (inputs, targets) with the task's shapes and value ranges."""
  k_x, k_y = jax.random.split(key)
  shape = (cfg['batch'], *cfg['input_shape'])
  if cfg['task'] == 'parity':
    x_BxL = jnp.where(jax.random.bernoulli(k_x, 0.5, shape), 1.0, -1.0)
    # Cumulative parity of the -1s, as tasks/parity builds its targets.
    targets_BxL = jnp.cumsum(x_BxL < 0, axis=1) % 2
    return x_BxL, targets_BxL.astype(jnp.int32)
  x_BxHxWxC = jax.random.normal(k_x, shape, jnp.float32)
  if cfg['task'] == 'image_classification':
    return x_BxHxWxC, jax.random.randint(k_y, (cfg['batch'],), 0, cfg['num_classes'])
  # Maze routes: 5 move classes (up, down, left, right, wait).
  return x_BxHxWxC, jax.random.randint(k_y, (cfg['batch'], cfg['route_length']), 0, 5)


def task_loss(task, out, targets):
  if task == 'parity':
    return losses.parity_loss(out.predictions, out.certainties, targets)[0]
  if task == 'image_classification':
    return losses.image_classification_loss(out.predictions, out.certainties, targets)[0]
  return losses.maze_loss(out.predictions, out.certainties, targets)[0]


def build_steps(model, task, tx):
  """(forward, train_step) as pure functions; jitting is left to the caller."""

  def forward(variables, x):
    out = model.apply(variables, x, train=False)
    return out.predictions, out.certainties

  def train_step(state, x, targets):
    dropout_key = jax.random.fold_in(state['rng'], state['step'])

    def loss_fn(params):
      variables = {'params': params, **state['model_state']}
      out, updates = model.apply(
          variables, x, train=True, rngs={'dropout': dropout_key}, mutable=['batch_stats']
      )
      return task_loss(task, out, targets), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    param_updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = project_decay_params(optax.apply_updates(state['params'], param_updates))
    model_state = {**state['model_state'], **updates}
    new_state = dict(
        params=params,
        opt_state=opt_state,
        model_state=model_state,
        rng=state['rng'],
        step=state['step'] + 1,
    )
    return new_state, loss

  return forward, train_step


def aot_compile(fn, *args):
  """(compiled, lower_s, compile_s) for an already-jitted `fn`."""
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, t1 - t0, t2 - t1


def time_calls(call, warmup, repeats):
  """Wall times (s) of `repeats` calls after `warmup` calls; `call()` must block."""
  for _ in range(warmup):
    call()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return times


def time_interleaved(calls, warmup, repeats):
  """Per call, wall times (s) of `repeats` rounds after `warmup` rounds.

  A round runs every call once, the order reversed every other round, so that
  machine noise (other processes, clocks) hits all of them alike.
  """
  times = [[] for _ in calls]
  for i in range(warmup + repeats):
    order = list(range(len(calls)))[:: -1 if i % 2 else 1]
    for j in order:
      t0 = time.perf_counter()
      calls[j]()
      if i >= warmup:
        times[j].append(time.perf_counter() - t0)
  return times


def memory_analysis_of(compiled):
  try:
    mem = compiled.memory_analysis()
  except Exception:
    return None
  if mem is None:
    return None
  fields = (
      'temp_size_in_bytes',
      'argument_size_in_bytes',
      'output_size_in_bytes',
      'alias_size_in_bytes',
      'generated_code_size_in_bytes',
  )
  out = {f: int(getattr(mem, f, 0) or 0) for f in fields}
  out['total_bytes'] = (
      out['temp_size_in_bytes']
      + out['argument_size_in_bytes']
      + out['output_size_in_bytes']
      - out['alias_size_in_bytes']
  )
  return out


def device_peak_bytes():
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:
    return None
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def log(msg):
  print(f'[{time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def run_config(name, args):
  cfg = CONFIGS[name]

  def make_model(iterations=cfg['model']['iterations'], unroll=args.unroll):
    # The command line's compute options replace the config's.
    return ContinuousThoughtMachine(
        **{
            **cfg['model'],
            'iterations': iterations,
            'remat': args.remat,
            'dtype': jnp.dtype(args.dtype),
            'unroll': unroll,
        }
    )

  model = make_model()
  x, targets = make_batch(cfg, jax.random.key(0))
  log(f'{name}: init')
  variables = jax.jit(model.init)(jax.random.key(1), x)
  variables = flax.core.unfreeze(variables)
  params = variables.pop('params')
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  tx = optax.adamw(1e-4)
  forward, train_step = build_steps(model, cfg['task'], tx)

  # Forward.
  fwd_variables = {'params': params, **variables}
  fwd = jax.jit(forward)
  log(f'{name}: compile forward')
  fwd_compiled, fwd_lower_s, fwd_compile_s = aot_compile(fwd, fwd_variables, x)
  log(f'{name}: forward lower {fwd_lower_s:.1f}s compile {fwd_compile_s:.1f}s; timing')
  fwd_times = time_calls(
      lambda: jax.block_until_ready(fwd_compiled(fwd_variables, x)), args.warmup, args.repeats
  )
  log(f'{name}: forward median {statistics.median(fwd_times):.3f}s')

  # Train step, state donated.
  state = dict(
      params=params,
      opt_state=jax.jit(tx.init)(params),
      model_state=variables,
      rng=jax.random.key(2),
      step=jnp.zeros((), jnp.int32),
  )
  # FLOPs first: lowering reads the state, which training then donates.
  # Parameter shapes do not depend on the tick count, so one state serves all.
  log(f'{name}: FLOPs from 1- and 2-tick lowerings')
  ticks = cfg['model']['iterations']
  build = lambda t, u, i: jax.jit(build_steps(make_model(t, u), cfg['task'], tx)[i])
  fwd_flops = flops_lib.tick_scaled_flops(
      lambda t, u: build(t, u, 0).lower(fwd_variables, x), ticks
  )
  train_flops = flops_lib.tick_scaled_flops(
      lambda t, u: build(t, u, 1).lower(state, x, targets), ticks
  )
  step = jax.jit(train_step, donate_argnums=0)
  log(f'{name}: compile train step')
  train_compiled, train_lower_s, train_compile_s = aot_compile(step, state, x, targets)
  log(f'{name}: train lower {train_lower_s:.1f}s compile {train_compile_s:.1f}s; timing')
  holder = {'state': state}
  losses_seen = []

  def one_step():
    holder['state'], loss = train_compiled(holder['state'], x, targets)
    losses_seen.append(float(loss))  # Blocks until the step is done.

  if args.reference:
    ref_result, train_times = time_against_reference(
        name, cfg, one_step, losses_seen, x, targets, n_params, args
    )
  else:
    ref_result = {}
    train_times = time_calls(one_step, args.warmup, args.repeats)
  log(f'{name}: train median {statistics.median(train_times):.3f}s')
  if not all(np.isfinite(losses_seen)):
    raise FloatingPointError(f'{name}: non-finite train loss {losses_seen}')

  return dict(
      config=name,
      source=cfg['source'],
      task=cfg['task'],
      batch=cfg['batch'],
      input_shape=list(cfg['input_shape']),
      model={**cfg['model'], 'prediction_reshaper': list(cfg['model']['prediction_reshaper'])},
      remat=args.remat,
      dtype=args.dtype,
      unroll=args.unroll,
      n_params=n_params,
      forward_lower_s=fwd_lower_s,
      forward_compile_s=fwd_compile_s,
      forward_times_s=fwd_times,
      forward_median_s=statistics.median(fwd_times),
      train_lower_s=train_lower_s,
      train_compile_s=train_compile_s,
      train_times_s=train_times,
      train_median_s=statistics.median(train_times),
      train_losses=losses_seen,
      forward_flops=fwd_flops,
      train_flops=train_flops,
      forward_flops_xla_raw=flops_lib.cost_flops(fwd_compiled),
      train_flops_xla_raw=flops_lib.cost_flops(train_compiled),
      train_memory_analysis=memory_analysis_of(train_compiled),
      forward_memory_analysis=memory_analysis_of(fwd_compiled),
      device_peak_bytes=device_peak_bytes(),
      **ref_result,
  )


def time_against_reference(name, cfg, one_step, losses_seen, x, targets, n_params, args):
  """(reference fields of the result, our train times), timed interleaved.

  Builds the PyTorch reference (`reference_adapter`) on the same batch and
  alternates our train step with its train step, round by round.
  """
  ref = load_reference(args.reference)
  if jax.devices()[0].platform != 'cpu':
    log(f'{name}: WARNING the reference runs on the CPU, ours on {jax.devices()[0].platform}')
  log(f'{name}: build the reference model ({ref.torch.__version__}, {ref.threads} threads)')
  ref_step = reference_adapter.ReferenceTrainStep(ref, cfg, np.asarray(x), np.asarray(targets))
  log(f'{name}: timing ours and the reference, interleaved')
  train_times, ref_times = time_interleaved([one_step, ref_step.step], args.warmup, args.repeats)
  ref_losses = ref_step.losses
  # Both models are at init at their first step: the same config and loss give
  # losses of similar size (near log(classes)); a large gap means the configs differ.
  log(
      f'{name}: first-step loss ours {losses_seen[0]:.4f} reference {ref_losses[0]:.4f}; '
      f'params ours {n_params} reference {ref_step.n_params}'
  )
  if not all(np.isfinite(ref_losses)):
    raise FloatingPointError(f'{name}: non-finite reference train loss {ref_losses}')
  if not 0.5 <= ref_losses[0] / losses_seen[0] <= 2:
    log(f'{name}: WARNING first-step losses differ by more than 2x: check the config mapping')
  ref_median = statistics.median(ref_times)
  speedup = ref_median / statistics.median(train_times)
  log(f'{name}: reference train median {ref_median:.3f}s, speedup {speedup:.2f}x')
  return (
      dict(
          ref_n_params=ref_step.n_params,
          ref_model_kwargs=dict(ref_step.kwargs),
          ref_train_times_s=ref_times,
          ref_train_median_s=ref_median,
          ref_train_losses=ref_losses,
          speedup=speedup,
      ),
      train_times,
  )


_REFERENCE = {}


def load_reference(ref_dir):
  """The reference imported from `ref_dir` (once per process)."""
  if ref_dir not in _REFERENCE:
    _REFERENCE[ref_dir] = reference_adapter.Reference(ref_dir)
  return _REFERENCE[ref_dir]


def run_isolated(name, args):
  """Runs one config in a fresh process, so the device's peak is its own."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'result.json')
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        f'--configs={name}',
        f'--json={path}',
        f'--repeats={args.repeats}',
        f'--warmup={args.warmup}',
        f'--remat={args.remat}',
        f'--dtype={args.dtype}',
        f'--unroll={args.unroll}',
        '--isolate=no',
    ] + ([f'--reference={args.reference}'] if args.reference else [])
    proc = subprocess.run(cmd, stdout=sys.stderr, check=False)
    if proc.returncode:
      return dict(config=name, error=f'subprocess exited with {proc.returncode}')
    with open(path) as f:
      return json.load(f)['results'][0]


def git_commit():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    sha = subprocess.run(
        ['git', '-C', root, 'rev-parse', '--short', 'HEAD'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ['git', '-C', root, 'status', '--porcelain', '--untracked-files=no'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
  return sha + ('-dirty' if dirty else '')


def environment():
  device = jax.devices()[0]
  return dict(
      device_kind=device.device_kind,
      platform=device.platform,
      device_count=jax.device_count(),
      cpu_count=os.cpu_count(),
      jax=jax.__version__,
      jaxlib=getattr(jax.lib, '__version__', None) or _jaxlib_version(),
      flax=flax.__version__,
      optax=optax.__version__,
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      git_commit=git_commit(),
  )


def _jaxlib_version():
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top

    return jaxlib.__version__
  except ImportError:
    return None


def uses_device_peak(env):
  return env['platform'] in ('gpu', 'cuda', 'rocm', 'tpu')


def format_table(env, results, args):
  device_peak = uses_device_peak(env)
  mem_label = 'peak mem GiB' if device_peak else 'XLA mem GiB'
  lines = [
      f"# CTM model benchmark | device: {env['device_kind']} ({env['platform']}, "
      f"{env['device_count']} device(s), {env['cpu_count']} host CPUs)",
      f"# jax {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}, optax {env['optax']} "
      f"| {env['date']} | git {env['git_commit']}",
      f'# remat={args.remat} dtype={args.dtype} unroll={args.unroll} '
      f'| medians over --repeats={args.repeats} after --warmup={args.warmup}',
      '# compile = lower + compile (AOT) of the jitted function, timed apart from execution.',
      '# train = fwd(train=True) + task loss + backward + adamw + decay projection, '
      'state donated.',
  ]
  if device_peak:
    lines.append(
        "# peak mem = device memory_stats()['peak_bytes_in_use'] of a fresh process "
        'per config (init + forward + train step).'
    )
  else:
    lines.append(
        '# XLA mem = compiled train step memory_analysis(): temp + argument + '
        'output - alias bytes (no device memory_stats() on this platform).'
    )
  lines.append(
      '# train GFLOP = XLA HLO cost analysis of one train step, tick loop scaled: '
      'F(T=1) + (T-1) * (F(T=2, unrolled) - F(T=1)).'
  )
  ref = env.get('reference') if args.reference else None
  if ref:
    lines += [
        f"# ref train = PyTorch reference ({ref['dir']}, commit {ref['commit']}), torch "
        f"{ref['torch']}, float32 on the CPU with {ref['torch_threads']} threads:",
        '#   zero_grad + fwd + loss + backward + AdamW step, timed interleaved with ours '
        '(alternating rounds, same process, same batch).',
        '# speedup = ref train median / our train median (above 1: ours is faster).',
    ]
  header = (
      'config',
      'params',
      'fwd compile s',
      'fwd median s',
      'train compile s',
      'train median s',
      mem_label,
      'train GFLOP',
  ) + (('ref train s', 'speedup') if ref else ())
  rows = []
  for r in results:
    if 'error' in r:
      rows.append((r['config'], 'ERROR: ' + r['error']) + ('',) * (len(header) - 2))
      continue
    if device_peak:
      mem = r.get('device_peak_bytes')
    else:
      mem = (r.get('train_memory_analysis') or {}).get('total_bytes')
    row = (
        r['config'],
        f"{r['n_params'] / 1e6:.2f}M",
        f"{r['forward_lower_s'] + r['forward_compile_s']:.1f}",
        f"{r['forward_median_s']:.3f}",
        f"{r['train_lower_s'] + r['train_compile_s']:.1f}",
        f"{r['train_median_s']:.3f}",
        '-' if mem is None else f'{mem / 2**30:.2f}',
        '-' if r.get('train_flops') is None else f"{r['train_flops'] / 1e9:.1f}",
    )
    if ref:
      row += (
          (f"{r['ref_train_median_s']:.3f}", f"{r['speedup']:.2f}x")
          if 'speedup' in r
          else ('-', '-')
      )
    rows.append(row)
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  fmt = lambda row: ' | '.join(str(c).ljust(w) for c, w in zip(row, widths))
  lines += [fmt(header), '-+-'.join('-' * w for w in widths)] + [fmt(r) for r in rows]
  return '\n'.join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument(
      '--configs', default=','.join(CONFIGS), help=f'comma-separated subset of {list(CONFIGS)}'
  )
  p.add_argument('--repeats', type=int, default=10, help='timed calls per measurement')
  p.add_argument('--warmup', type=int, default=2, help='untimed calls before timing')
  p.add_argument('--json', default=None, help='write environment and results here')
  p.add_argument(
      '--remat',
      default='none',
      choices=['none', 'full', 'dots'],
      help='tick-body rematerialisation policy',
  )
  p.add_argument(
      '--dtype',
      default='float32',
      choices=['float32', 'bfloat16'],
      help='compute dtype (parameters stay float32)',
  )
  p.add_argument('--unroll', type=int, default=1, help='tick scan unroll factor')
  p.add_argument(
      '--isolate',
      default='auto',
      choices=['auto', 'yes', 'no'],
      help='one subprocess per config (auto: yes on GPU/TPU, where the '
      'device peak is process-wide)',
  )
  p.add_argument(
      '--reference',
      default=None,
      metavar='DIR',
      help='a local checkout of github.com/SakanaAI/continuous-thought-machines: also time '
      'its PyTorch train step, interleaved with ours, and report the speedup',
  )
  args = p.parse_args(argv)
  names = [n for n in args.configs.split(',') if n]
  unknown = [n for n in names if n not in CONFIGS]
  if unknown:
    p.error(f'--configs: unknown {unknown}; expected some of {list(CONFIGS)}')
  if args.repeats < 1 or args.warmup < 0:
    p.error('--repeats must be >= 1 and --warmup >= 0')
  if args.reference and not os.path.isfile(os.path.join(args.reference, 'models', 'ctm.py')):
    p.error(f'--reference={args.reference}: no models/ctm.py there')
  args.config_names = names
  return args


def main(argv=None):
  args = parse_args(argv)
  env = environment()
  if args.reference:
    env['reference'] = load_reference(args.reference).info()
  isolate = args.isolate == 'yes' or (
      args.isolate == 'auto' and uses_device_peak(env) and len(args.config_names) > 1
  )
  log(
      f"device {env['device_kind']}, jax {env['jax']}, configs {args.config_names}, "
      f'isolate={isolate}'
  )
  results = []
  for name in args.config_names:
    if isolate:
      results.append(run_isolated(name, args))
    else:
      results.append(run_config(name, args))
    if args.json:  # Written after each config, so a long run keeps partial results.
      with open(args.json, 'w') as f:
        json.dump(
            dict(environment=env, args={k: v for k, v in vars(args).items()}, results=results),
            f,
            indent=1,
        )
  print(format_table(env, results, args), flush=True)


if __name__ == '__main__':
  main()
