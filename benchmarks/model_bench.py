"""Compile time, step time, memory and FLOPs of the trainer's CTM step on the reference's configs.

Usage (from the repo root):
  python -m benchmarks.model_bench                        # all configs, one table
  python -m benchmarks.model_bench --configs=parity_b16,cifar10_b32 \
      --repeats=3 --warmup=1 --json=/tmp/bench.json
  python -m benchmarks.model_bench --dtype=bfloat16       # bf16 compute, bf16 peak
  python -m benchmarks.model_bench --configs=cifar10_b32 --repeats=3 --warmup=1 \
      --reference=/path/to/continuous-thought-machines  # + PyTorch reference
  python -m benchmarks.model_bench --scaling --json=/tmp/scaling.json
      # memory (remat) at 25 vs 75 ticks, compile time at 10 vs 75 ticks

Configs (`CONFIGS`; all of them by default): each names a config file of
ctm_jax.configs, a variant and a batch size. parity_b16 and parity_b64
(configs/parity.py: the 75-tick, 25-memory parity model of
train_ctm_75_25.sh), cifar10_b32 (configs/cifar10.py), maze_b16
(configs/mazes.py:benchmark) and imagenet_b2 (configs/imagenet.py: 224x224, resnet152-4,
batch 2). On a 2-core CPU imagenet_b2 alone takes about 4 minutes for init,
compiles and one step of each kind (8 GiB resident; a train step ~70 s), so
with the default --repeats it dominates a CPU run: leave it out with --configs
there.

Each config is the whole task config (`get_config(variant)`: model, optimiser,
loss), with `batch_size` from the table and `model.remat`, `model.dtype` and
`model.unroll` from the command line. The step timed is the trainer's own:
`supervised.setup(config, model, task, mesh)` on a 1-device mesh, whatever the
task; every task-specific piece (model kwargs, model inputs, loss, metrics,
synthetic batches) comes from the task (ctm_jax/tasks/).

Each run first measures the device's matmul peak (`matmul_peak.py`: jitted
square a @ b in the compute dtype, the best of a few sizes), then per config:
  compile    lower + compile of the jitted function (AOT, `jit(f).lower(...)
             .compile()`), timed apart from any execution. The persistent
             compilation cache is off, so every compile is cold.
  forward    `model.apply(variables, task.model_inputs(batch))` (train=False),
             jitted; median wall time over --repeats calls after --warmup
             calls, each call blocked until ready.
  train      the trainer's `setup(...).train_step`, state donated: forward
             (train=True) + the task's loss + backward + the config's
             optimiser (ctm_jax/optim.py: quantile or global-norm clipping,
             AdamW on the LR schedule, the weight-decay mask) + the finite
             guard + decay projection + the task's train metrics; the state
             from `setup.init()`, the batch from `task.synthetic_batch` on the
             batch sharding; median as above.
  memory     on GPU/TPU: the device's `memory_stats()['peak_bytes_in_use']`
             (a process-wide high-water mark, so each config runs in its own
             subprocess there; it covers init, forward and train step).
             Elsewhere (CPU): the compiled train step's `memory_analysis()`,
             temp + argument + output - alias bytes (alias = donated buffers
             that the output reuses, which would otherwise be counted twice).
  FLOPs      XLA's HLO cost analysis of the train step (and forward). XLA
             counts a while loop's body once whatever its trip count, so the
             raw `compiled.cost_analysis()['flops']` holds one tick. The table
             scales it (ctm_jax/tools/flops.py): F = F(T=1) + (T - 1) *
             (F(T=2, unrolled) - F(T=1)), from the cost analysis of 1- and
             2-tick variants of the same config (lowered from shapes on CPU,
             compiled elsewhere); the raw figure is in the JSON.
  XLA/analytic  the scaled train FLOPs over an analytic count of the model's
             matmuls and convolutions from its options and input shape
             (`analytic_flops.py`, fed `task.model_kwargs(config)` and
             `task.record_spec(config)['inputs']`: 2 FLOPs per multiply-add,
             train = forward + input and weight gradients = 3x forward, plus
             the tick body's recomputation under --remat). XLA also counts
             elementwise work (norms, activations, softmax, the optimiser and
             its clipping), so a ratio somewhat above 1 is expected (about
             1.02-1.06 on these configs); far from that, one of the counts
             misses work. tests/benchmarks_test.py checks that the analytic
             count equals the matmuls and convolutions of the traced step.
  GFLOP/s    achieved: train FLOPs (XLA, scaled) / train median time.
  % peak     achieved GFLOP/s / the matmul peak measured at the start of the
             same run (printed in the table header; in the JSON environment).
  ref train  with --reference=DIR, a local checkout of
             github.com/SakanaAI/continuous-thought-machines (imported from DIR
             at run time by `reference_adapter.py`; it needs torch, and
             autoclip for a quantile-clipped config): the reference's own
             train step as its task's train.py runs it, on the same model
             options, batch and loss, with the config's optimiser settings
             where its script reads them (zero_grad, forward, loss, backward,
             the script's clipping: autoclip's QuantileClip or
             clip_grad_norm_, torch.optim.AdamW step, scheduler step). It has
             no finite guard and no metrics beyond the loss: ours is the
             trainer's step, the reference's its script's. It runs on the CPU
             with all cores, in a worker process of its own (so that the two
             frameworks share neither heap nor thread pools). It is timed
             interleaved with ours (rounds of one turn each, the order
             alternating), so machine noise hits both alike; each turn runs
             two steps and times the second, as the first step after a switch
             pays for the other process's memory churn (on this project's VM,
             parity batch 64: up to 1.9x for ours, about 1.06x for the
             reference); median over the same --warmup and --repeats.
             speedup = ref median / our train median: above 1, ours is
             faster. The first step's losses of both models (at init) are
             logged as a check that the configs match. The reference always
             runs in float32.

On GPU/TPU (--isolate=auto) this process never touches the device: the matmul
peak and every config run in fresh subprocesses, so each peak memory is that
config's own and no process holds the device while another needs it.

--scaling measures instead how the train step grows with the tick count, for
--scaling_config (parity_b64) at --scaling_batch (its own batch) under --remat
(default 'sqrt' here: chunks of ~sqrt(T) ticks rematerialised; 'none'
otherwise): memory at --memory_ticks (25,75) and lower + compile time at
--compile_ticks (10,75), median over --scaling_repeats fresh jits each, and
prints the ratios (later / earlier) beside the issue's
bounds (memory <= 1.3x, compile <= 1.2x). Memory needs no execution on the CPU
(`memory_analysis()` as above); on GPU/TPU each tick count runs one train step
in a fresh subprocess and reports the device's peak.

Dimension glossary: B batch, T ticks.
"""

import argparse
import importlib
import os
import statistics

import jax
import ml_collections
import numpy as np

from ctm_jax import hostmem
from ctm_jax import sharding
from ctm_jax import steps
from ctm_jax import tasks
from ctm_jax import validation
from ctm_jax.models.ctm import COMPUTE_FIELDS
from ctm_jax.models.ctm import REMAT_POLICIES
from ctm_jax.tools import flops as flops_lib

from benchmarks import analytic_flops
from benchmarks import harness
from benchmarks import matmul_peak
from benchmarks import reference_adapter

# name -> (config file of configs/ (ctm_jax.configs) and variant, as --config
# names them, batch size).
CONFIGS = {
    'parity_b16': ('parity.py:default', 16),
    'parity_b64': ('parity.py:default', 64),
    'cifar10_b32': ('cifar10.py:default', 32),
    'maze_b16': ('mazes.py:benchmark', 16),
    # Batch 2: the smallest at which ImageNet's train step still fits a
    # 2-core CPU run (~70 s a step, 8 GiB); BatchNorm sees 2 x 14 x 14 values
    # per channel at its last stage.
    'imagenet_b2': ('imagenet.py:default', 2),
}
# The bounds on tick scaling (--scaling): ratio of the later tick count's figure.
MEMORY_RATIO_BOUND = 1.3
COMPILE_RATIO_BOUND = 1.2


def task_config(
    source, batch, remat='none', dtype='float32', unroll=1, deferred_grads=False
) -> ml_collections.ConfigDict:
  """The config `source` ('<file>.py:<variant>' of configs/, as --config=configs/<source>)
  at batch size `batch` (None: its own), with the command line's compute options in place of the config's."""
  file, _, variant = source.partition(':')
  module = importlib.import_module(f'ctm_jax.configs.{file.removesuffix(".py")}')
  config = module.get_config(variant or None)
  if batch is not None:  # None: the config's own
    config.batch_size = batch
    config.batch_size_test = batch
  config.model.update(remat=remat, dtype=str(dtype), unroll=unroll)
  if deferred_grads:  # a CTM option; the baselines' configs lack it
    config.model.deferred_grads = True
  return config


def bench_config(name, args, batch=None) -> ml_collections.ConfigDict:
  """The task config of `CONFIGS[name]` under the command line's options."""
  source, default_batch = CONFIGS[name]
  return task_config(
      source,
      batch or default_batch,
      args.remat,
      args.dtype,
      args.unroll,
      getattr(args, 'deferred_grads', False),
  )


def with_ticks(config, ticks, unroll=None):
  """A copy of `config` whose model runs `ticks` ticks (and scan `unroll`)."""
  variant = config.copy_and_resolve_references()
  variant.model.iterations = ticks
  if unroll is not None:
    variant.model.unroll = unroll
  return variant


def forward_fn(bench):
  """Jitted (variables, model inputs) -> (predictions, certainties): `apply(train=False)`."""
  model = bench.model

  def forward(variables, inputs):
    with sharding.logical_rules():  # as the trainer's steps are traced
      out = model.apply(variables, inputs)
    return out.predictions, out.certainties

  return jax.jit(forward)


def forward_args(bench, state, batch):
  """`forward_fn`'s arguments from a train state (or its shapes) and a batch (or its shapes)."""
  return steps.variables(state, state.params), bench.task.model_inputs(batch)


def analytic_spec(config) -> dict:
  """What analytic_flops counts from: batch, input shape and model options, from the task."""
  task = validation.validate(config, num_devices=1)
  return dict(
      batch=config.batch_size,
      input_shape=tuple(task.record_spec(config)['inputs'][0]),
      model=task.model_kwargs(config),
  )


def reference_spec(config, task) -> dict:
  """What reference_adapter builds the reference's step from (JSON-able): the task
  name, the reference's loss function, our model's constructor kwargs and the
  whole config (the trainer keys are the reference scripts' argparse names).
  Our compute options (ctm.COMPUTE_FIELDS), which the reference lacks, are left out."""
  if not isinstance(task, tasks.ImportsReference):
    raise ValueError(f'config.task={task.name!r}: the reference has no such task to time')
  kwargs = {k: v for k, v in task.model_kwargs(config).items() if k not in COMPUTE_FIELDS}
  kwargs['prediction_reshaper'] = list(kwargs['prediction_reshaper'])
  loss = task.reference_loss or f'{task.name}_loss'
  return dict(task=config.task, loss=loss, model=kwargs, args=config.to_dict())


def optimizer_summary(config) -> dict:
  """The config's optimiser settings, for the JSON (ctm_jax/optim.py builds from these)."""
  keys = (
      'lr',
      'weight_decay',
      'weight_decay_exclude',
      'gradient_clipping',
      'gradient_clipping_type',
      'use_scheduler',
      'scheduler_type',
      'warmup_steps',
      'training_iterations',
  )
  return {k: config[k] for k in keys}


def xla_flops(config):
  """XLA's tick-scaled FLOPs of (forward, train step), lowered from shapes only.

  The train step is the trainer's (`supervised.setup`) of 1- and 2-tick variants of
  the config, as ctm_jax/tools/compile_check.py counts it.
  """
  ticks = config.model.iterations

  def lower(is_train, t, unroll):
    bench = harness.build(with_ticks(config, t, unroll))
    batch = harness.batch_shapes(bench)
    with jax.set_mesh(bench.mesh):
      if is_train:
        return harness.train_step(bench).lower(bench.run.abstract_state, batch)
      return forward_fn(bench).lower(*forward_args(bench, bench.run.abstract_state, batch))

  return tuple(
      flops_lib.tick_scaled_flops(lambda t, u, is_train=is_train: lower(is_train, t, u), ticks)
      for is_train in (False, True)
  )


def add_rates(result, peak):
  """Achieved FLOP/s of the train step and its fraction of the matmul `peak` (or None)."""
  if 'error' in result:
    return result
  flops, median = result.get('train_flops'), result['train_median_s']
  achieved = flops / median if flops else None
  peak_flops = peak['peak_flops_per_s'] if peak else None
  result.update(
      achieved_flops_per_s=achieved,
      matmul_peak_flops_per_s=peak_flops,
      matmul_peak_fraction=achieved / peak_flops if achieved and peak_flops else None,
  )
  return result


def run_config(name, args, peak=None):
  config = bench_config(name, args)
  bench = harness.build(config)
  with jax.set_mesh(bench.mesh):
    return measure(name, bench, args, peak)


def measure(name, bench, args, peak=None):
  """The result of one config: compiles, timings, memory, FLOPs (inside its mesh)."""
  config, task = bench.config, bench.task
  harness.log(f'{name}: init ({config.task}, batch {config.batch_size})')
  state = bench.run.init()
  batch = harness.device_batch(bench)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))

  # Forward.
  fwd = forward_fn(bench)
  fwd_args = forward_args(bench, state, batch)
  harness.log(f'{name}: compile forward')
  fwd_compiled, fwd_lower_s, fwd_compile_s = harness.aot_compile(fwd, *fwd_args)
  harness.log(f'{name}: forward lower {fwd_lower_s:.1f}s compile {fwd_compile_s:.1f}s; timing')
  fwd_times = harness.time_calls(
      lambda: jax.block_until_ready(fwd_compiled(*fwd_args)), args.warmup, args.repeats
  )
  del fwd_args
  harness.log(f'{name}: forward median {statistics.median(fwd_times):.3f}s')

  harness.log(f'{name}: FLOPs from 1- and 2-tick lowerings; analytic count')
  fwd_flops, train_flops = xla_flops(config)
  spec = analytic_spec(config)
  analytic_fwd = analytic_flops.forward_flops(spec)
  analytic_train = analytic_flops.train_flops(spec, config.model.remat)

  # The trainer's train step, state donated.
  harness.log(f'{name}: compile train step')
  train_compiled, train_lower_s, train_compile_s = harness.aot_compile(harness.train_step(bench), state, batch)
  harness.log(f'{name}: train lower {train_lower_s:.1f}s compile {train_compile_s:.1f}s; timing')
  train = harness.donated_steps(train_compiled, state, batch)
  del state
  metrics_seen = []

  def one_step():
    metrics_seen.append(train())

  if args.reference:
    ref_result, train_times = time_against_reference(
        name, config, task, one_step, metrics_seen, batch, n_params, args
    )
  else:
    ref_result = {}
    train_times = harness.time_calls(one_step, args.warmup, args.repeats)
  harness.log(f'{name}: train median {statistics.median(train_times):.3f}s')
  losses_seen = [float(m['loss']) for m in metrics_seen]
  if not all(bool(m['finite']) for m in metrics_seen):
    raise FloatingPointError(f'{name}: non-finite train loss or gradient {losses_seen}')

  ratio = lambda a, b: a / b if a and b else None
  result = dict(
      config=name,
      source=f'configs/{CONFIGS[name][0]}' if name in CONFIGS else None,
      task=config.task,
      batch=config.batch_size,
      input_shape=list(spec['input_shape']),
      model=reference_spec(config, task)['model'],
      optimizer=optimizer_summary(config),
      remat=config.model.remat,
      dtype=config.model.dtype,
      unroll=config.model.unroll,
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
      train_grad_norms=[float(m['grad_norm']) for m in metrics_seen],
      forward_flops=fwd_flops,
      train_flops=train_flops,
      forward_flops_xla_raw=flops_lib.cost_flops(fwd_compiled),
      train_flops_xla_raw=flops_lib.cost_flops(train_compiled),
      forward_flops_analytic=analytic_fwd,
      train_flops_analytic=analytic_train,
      forward_flops_xla_over_analytic=ratio(fwd_flops, analytic_fwd),
      train_flops_xla_over_analytic=ratio(train_flops, analytic_train),
      train_memory_analysis=harness.memory_analysis_of(train_compiled),
      forward_memory_analysis=harness.memory_analysis_of(fwd_compiled),
      device_peak_bytes=harness.device_peak_bytes(),
      **ref_result,
  )
  return add_rates(result, peak)


def time_against_reference(name, config, task, one_step, metrics_seen, batch, n_params, args):
  """(reference fields of the result, our train times), timed interleaved.

  Builds the PyTorch reference (`reference_adapter`) on the same batch and
  alternates our train step with its train step, round by round.
  """
  ref = load_reference(args.reference)
  if jax.devices()[0].platform != 'cpu':
    harness.log(f'{name}: WARNING the reference runs on the CPU, ours on {jax.devices()[0].platform}')
  harness.log(f'{name}: build the reference model ({ref.torch.__version__}, {ref.threads} threads)')
  ref_step = reference_adapter.ReferenceProcess(
      ref.dir,
      reference_spec(config, task),
      jax.device_get(batch),
      env=hostmem.environ_before_reexec(),
  )
  harness.log(f'{name}: reference optimiser {ref_step.optimizer_text}')
  try:
    harness.log(f'{name}: timing ours and the reference (its own process), interleaved')
    train_times, _ = harness.time_interleaved(
        [one_step, ref_step.step], args.warmup, args.repeats, untimed_first=True
    )
  finally:
    ref_step.close()
  # The worker's own times of the timed (second) step of each turn after warm-up.
  ref_times = ref_step.times[2 * args.warmup + 1 :: 2]
  ref_losses = ref_step.losses
  first_loss = float(metrics_seen[0]['loss'])
  # Both models are at init at their first step: the same config and loss give
  # losses of similar size (near log(classes)); a large gap means the configs differ.
  harness.log(
      f'{name}: first-step loss ours {first_loss:.4f} reference {ref_losses[0]:.4f}; '
      f'params ours {n_params} reference {ref_step.n_params}'
  )
  if not all(np.isfinite(ref_losses)):
    raise FloatingPointError(f'{name}: non-finite reference train loss {ref_losses}')
  if not 0.5 <= ref_losses[0] / first_loss <= 2:
    harness.log(f'{name}: WARNING first-step losses differ by more than 2x: check the config mapping')
  ref_median = statistics.median(ref_times)
  speedup = ref_median / statistics.median(train_times)
  harness.log(f'{name}: reference train median {ref_median:.3f}s, speedup {speedup:.2f}x')
  return (
      dict(
          ref_n_params=ref_step.n_params,
          ref_model_kwargs=dict(ref_step.kwargs),
          ref_optimizer=ref_step.optimizer_text,
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


def compute_flags(args):
  flags = [f'--remat={args.remat}', f'--dtype={args.dtype}', f'--unroll={args.unroll}']
  return flags + (['--deferred_grads'] if args.deferred_grads else [])


def run_isolated(name, args):
  """(environment, result) of one config run in a fresh process, so the device's peak is its own."""
  out = harness.run_child(
      'benchmarks.model_bench',
      [
          f'--configs={name}',
          f'--repeats={args.repeats}',
          f'--warmup={args.warmup}',
          *compute_flags(args),
          '--isolate=no',
          '--peak_sizes=none',  # The parent measures it once, for all configs.
      ]
      + ([f'--reference={args.reference}'] if args.reference else []),
  )
  if out is None:
    return None, dict(config=name, error='subprocess failed')
  return out['environment'], out['results'][0]


def measure_peak(args, isolate):
  """The matmul peak in the compute dtype (None with --peak_sizes=none)."""
  if args.peak_sizes == 'none':
    return None
  sizes = [int(n) for n in args.peak_sizes.split(',') if n] or None
  harness.log(f'matmul peak, {args.dtype}, sizes {sizes or "by platform"}')
  if isolate:
    flags = [f'--dtype={args.dtype}', f'--repeats={args.peak_repeats}']
    peak = harness.run_child('benchmarks.matmul_peak', flags + ([f'--sizes={args.peak_sizes}'] if sizes else []))
  else:
    peak = matmul_peak.measure(args.dtype, sizes, args.peak_repeats)
  if peak:
    harness.log(f'matmul peak {matmul_peak.describe(peak)}')
  return peak


# --- Tick scaling (--scaling) -------------------------------------------------


def scaling_config(args):
  return bench_config(args.scaling_config, args, batch=args.scaling_batch or None)


def compile_train_step(config, ticks):
  """(compiled, lower_s, compile_s) of a freshly built trainer's step with `ticks` ticks.

  Fresh each call (new setup, closures and jit), so nothing of an earlier
  compile is reused.
  """
  bench = harness.build(with_ticks(config, ticks))
  with jax.set_mesh(bench.mesh):
    return harness.aot_compile(harness.train_step(bench), bench.run.abstract_state, harness.batch_shapes(bench))


def measure_ticks(config, ticks_list, args, run_step=False):
  """Per tick count: train-step lower and compile times (--scaling_repeats each) and memory.

  With `run_step` (one tick count only: the device peak is process-wide), one
  step also runs, for the device's peak memory.
  """
  # The process's first compile also pays one-off setup that no tick count
  # should be charged with.
  compile_train_step(config, ticks_list[0])
  points = {t: dict(ticks=t, lower_s=[], compile_s=[]) for t in ticks_list}
  compiled = {}
  # Rounds over the tick counts, so that machine noise spreads over all of them.
  for _ in range(args.scaling_repeats):
    for ticks in ticks_list:
      compiled[ticks], lower_s, compile_s = compile_train_step(config, ticks)
      points[ticks]['lower_s'].append(lower_s)
      points[ticks]['compile_s'].append(compile_s)
  for ticks, point in points.items():
    point['lower_compile_median_s'] = statistics.median(
        a + b for a, b in zip(point['lower_s'], point['compile_s'])
    )
    point['train_memory_analysis'] = harness.memory_analysis_of(compiled[ticks])
    harness.log(f"{ticks} ticks: lower + compile median {point['lower_compile_median_s']:.1f}s")
  if run_step:
    (ticks,) = ticks_list
    bench = harness.build(with_ticks(config, ticks))
    with jax.set_mesh(bench.mesh):
      _, metrics = compiled[ticks](bench.run.init(), harness.device_batch(bench))
    points[ticks].update(loss=float(metrics['loss']), device_peak_bytes=harness.device_peak_bytes())
  return [points[t] for t in ticks_list]


def point_memory(point, device_peak):
  if device_peak:
    return point.get('device_peak_bytes')
  return (point.get('train_memory_analysis') or {}).get('total_bytes')


def run_scaling_point(ticks, config, args):
  """(environment, point) of one tick count measured in a fresh process."""
  out = harness.run_child(
      'benchmarks.model_bench',
      [
          f'--scaling_config={args.scaling_config}',
          f'--scaling_batch={config.batch_size}',
          f'--scaling_repeats={args.scaling_repeats}',
          f'--scaling_point={ticks}',
          *compute_flags(args),
          '--isolate=no',
      ],
  )
  if out is None:
    return None, dict(ticks=ticks, error='subprocess failed')
  return out['environment'], out['point']


def run_scaling(args, isolate):
  """(environment, summary) of the tick-scaling measurements."""
  config = scaling_config(args)
  all_ticks = sorted(set(args.memory_ticks + args.compile_ticks))
  harness.log(f'{args.scaling_config} batch {config.batch_size}: ticks {all_ticks}, remat={args.remat}')
  if not isolate:
    env, points = None, measure_ticks(config, all_ticks, args)
  else:
    env, points = None, []
    for ticks in all_ticks:  # One process per tick count: the device peak is process-wide.
      child_env, point = run_scaling_point(ticks, config, args)
      env = env or child_env
      points.append(point)
  env = env or harness.environment()
  device_peak = uses_device_peak(env)
  by_ticks = {p['ticks']: p for p in points if 'error' not in p}

  def ratio(ticks, value):
    first, last = (by_ticks.get(t) for t in ticks)
    a, b = (value(p) if p else None for p in (first, last))
    return b / a if a and b else None

  memory_ratio = ratio(args.memory_ticks, lambda p: point_memory(p, device_peak))
  compile_ratio = ratio(args.compile_ticks, lambda p: p['lower_compile_median_s'])
  summary = dict(
      config=args.scaling_config,
      batch=config.batch_size,
      remat=args.remat,
      dtype=args.dtype,
      unroll=args.unroll,
      repeats=args.scaling_repeats,
      memory_source='device_peak_bytes' if device_peak else 'memory_analysis total_bytes',
      memory_ticks=args.memory_ticks,
      compile_ticks=args.compile_ticks,
      memory_ratio=memory_ratio,
      memory_ratio_bound=MEMORY_RATIO_BOUND,
      compile_ratio=compile_ratio,
      compile_ratio_bound=COMPILE_RATIO_BOUND,
      points=points,
  )
  return env, summary


def format_scaling(env, summary):
  device_peak = uses_device_peak(env)
  lines = [
      f"# CTM tick scaling | device: {env['device_kind']} ({env['platform']}) "
      f"| jax {env['jax']} | {env['date']} | git {env['git_commit']}",
      f"# {summary['config']} at batch {summary['batch']}, remat={summary['remat']} "
      f"dtype={summary['dtype']} unroll={summary['unroll']}; train step only.",
      '# compile = lower + compile (AOT) of the train step, median over '
      f"{summary['repeats']} fresh jit(s); cold (no compilation cache).",
      (
          "# peak mem = device memory_stats()['peak_bytes_in_use'] of a fresh process per "
          'tick count (init + one train step).'
          if device_peak
          else '# XLA mem = compiled train step memory_analysis(): temp + argument + output '
          '- alias bytes (no execution).'
      ),
  ]
  header = (
      'ticks',
      'lower s',
      'compile s',
      'compile total s',
      'peak mem GiB' if device_peak else 'XLA mem GiB',
  )
  rows = []
  for p in summary['points']:
    if 'error' in p:
      rows.append((p['ticks'], 'ERROR: ' + p['error'], '', '', ''))
      continue
    mem = point_memory(p, device_peak)
    rows.append(
        (
            p['ticks'],
            f"{statistics.median(p['lower_s']):.1f}",
            f"{statistics.median(p['compile_s']):.1f}",
            f"{p['lower_compile_median_s']:.1f}",
            '-' if mem is None else f'{mem / 2**30:.3f}',
        )
    )
  lines += _table(header, rows)

  def verdict(what, ticks, ratio, bound):
    if ratio is None:
      return f'# {what} {ticks[1]} / {ticks[0]} ticks: not measured'
    within = 'within' if ratio <= bound else 'OVER'
    return f'# {what} {ticks[1]} / {ticks[0]} ticks: {ratio:.3f}x (bound {bound}x: {within})'

  lines += [
      verdict('memory', summary['memory_ticks'], summary['memory_ratio'], MEMORY_RATIO_BOUND),
      verdict('compile', summary['compile_ticks'], summary['compile_ratio'], COMPILE_RATIO_BOUND),
  ]
  return '\n'.join(lines)


def _table(header, rows):
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  fmt = lambda row: ' | '.join(str(c).ljust(w) for c, w in zip(row, widths))
  return [fmt(header), '-+-'.join('-' * w for w in widths)] + [fmt(r) for r in rows]


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
      f"# host allocator: {env.get('host_allocator', 'not recorded')} (ctm_jax/hostmem.py; "
      'a --reference worker runs without it)',
      f'# remat={args.remat} dtype={args.dtype} unroll={args.unroll} '
      f'deferred_grads={args.deferred_grads} '
      f'| medians over --repeats={args.repeats} after --warmup={args.warmup}',
      '# compile = lower + compile (AOT) of the jitted function, timed apart from execution.',
      "# train = the trainer's step (supervised.setup(...).train_step, state donated): fwd(train=True) "
      '+ task loss + backward',
      "#   + the config's optimiser (clipping, AdamW, LR schedule) + finite guard + decay "
      "projection + task metrics; the task's synthetic batch.",
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
  peak = env.get('matmul_peak')
  lines += [
      '# train GFLOP = XLA HLO cost analysis of one train step, tick loop scaled: '
      'F(T=1) + (T-1) * (F(T=2, unrolled) - F(T=1)).',
      '# XLA/analytic = train GFLOP / the matmul + conv FLOPs counted from the config '
      '(benchmarks/analytic_flops.py: 3x forward',
      '#   + remat recompute); XLA also counts elementwise ops, so somewhat above 1 '
      '(1.02-1.06 on these configs) is expected.',
      '# GFLOP/s = train GFLOP / train median s; % peak = GFLOP/s / the matmul peak '
      'below, measured in this run.',
      '# matmul peak: '
      + (matmul_peak.describe(peak) if peak else 'not measured (--peak_sizes=none)'),
  ]
  ref = env.get('reference') if args.reference else None
  if ref:
    lines += [
        f"# ref train = PyTorch reference ({ref['dir']}, commit {ref['commit']}), torch "
        f"{ref['torch']}, float32 on the CPU with {ref['torch_threads']} threads:",
        "#   its task's train.py step: zero_grad + fwd + loss + backward + the script's "
        'clipping (QuantileClip or clip_grad_norm_)',
        "#   + AdamW + scheduler step, with the config's lr, weight decay and clipping (no finite "
        'guard, no metrics),',
        '#   in a worker process, timed interleaved with ours (alternating turns of two steps, '
        'the second timed; same batch).',
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
      'XLA/analytic',
      'GFLOP/s',
      '% peak',
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
        _fmt(r.get('train_flops'), '{:.1f}', 1e-9),
        _fmt(r.get('train_flops_xla_over_analytic'), '{:.3f}'),
        _fmt(r.get('achieved_flops_per_s'), '{:.1f}', 1e-9),
        _fmt(r.get('matmul_peak_fraction'), '{:.1f}', 100),
    )
    if ref:
      row += (
          (f"{r['ref_train_median_s']:.3f}", f"{r['speedup']:.2f}x")
          if 'speedup' in r
          else ('-', '-')
      )
    rows.append(row)
  return '\n'.join(lines + _table(header, rows))


def _fmt(value, spec, scale=1.0):
  return '-' if value is None else spec.format(value * scale)


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
      default=None,
      choices=list(REMAT_POLICIES),
      help="tick-body rematerialisation policy (default: 'none'; 'sqrt' with --scaling)",
  )
  p.add_argument(
      '--dtype',
      default='float32',
      choices=['float32', 'bfloat16'],
      help="compute dtype (parameters stay float32); also the matmul peak's dtype",
  )
  p.add_argument('--unroll', type=int, default=1, help='tick scan unroll factor')
  p.add_argument(
      '--deferred_grads',
      action='store_true',
      help='config.model.deferred_grads: weight gradients after the backward scan',
  )
  p.add_argument(
      '--isolate',
      default='auto',
      choices=['auto', 'yes', 'no'],
      help='run the matmul peak and each config (or tick count) in a subprocess '
      '(auto: yes on GPU/TPU, where the device peak is process-wide)',
  )
  p.add_argument(
      '--reference',
      default=None,
      metavar='DIR',
      help='a local checkout of github.com/SakanaAI/continuous-thought-machines: also time '
      'its PyTorch train step, interleaved with ours, and report the speedup',
  )
  p.add_argument(
      '--peak_sizes',
      default='',
      help='comma-separated N of the N x N matmuls timed for the peak (default: '
      f'{",".join(map(str, matmul_peak.CPU_SIZES))} on CPU, '
      f'{",".join(map(str, matmul_peak.ACCELERATOR_SIZES))} elsewhere); none: skip',
  )
  p.add_argument('--peak_repeats', type=int, default=5, help='timed samples per peak size')
  p.add_argument(
      '--scaling',
      action='store_true',
      help='instead of the table: train-step memory and compile time against the tick count',
  )
  p.add_argument(
      '--scaling_config',
      default='parity_b64',
      help=f'the config --scaling measures, one of {list(CONFIGS)}',
  )
  p.add_argument('--scaling_batch', type=int, default=0, help="--scaling's batch (0: the config's)")
  p.add_argument(
      '--memory_ticks', default='25,75', help='two tick counts: memory ratio second / first'
  )
  p.add_argument(
      '--compile_ticks', default='10,75', help='two tick counts: compile ratio second / first'
  )
  p.add_argument(
      '--scaling_repeats', type=int, default=3, help='fresh compiles per tick count (median)'
  )
  # Internal: a --scaling subprocess measuring one tick count.
  p.add_argument('--scaling_point', type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  names = [n for n in args.configs.split(',') if n]
  unknown = [n for n in names if n not in CONFIGS]
  if unknown:
    p.error(f'--configs: unknown {unknown}; expected some of {list(CONFIGS)}')
  if args.repeats < 1 or args.warmup < 0:
    p.error('--repeats must be >= 1 and --warmup >= 0')
  if args.reference and not os.path.isfile(os.path.join(args.reference, 'models', 'ctm.py')):
    p.error(f'--reference={args.reference}: no models/ctm.py there')
  if args.peak_repeats < 1:
    p.error('--peak_repeats must be >= 1')
  if args.peak_sizes not in ('', 'none'):
    try:
      assert all(int(n) > 0 for n in args.peak_sizes.split(','))
    except (ValueError, AssertionError):
      p.error(f'--peak_sizes={args.peak_sizes}: expected positive integers or none')
  if args.scaling_config not in CONFIGS:
    p.error(f'--scaling_config: unknown {args.scaling_config}; expected one of {list(CONFIGS)}')
  for flag in ('memory_ticks', 'compile_ticks'):
    try:
      ticks = [int(t) for t in getattr(args, flag).split(',')]
    except ValueError:
      ticks = []
    if len(ticks) != 2 or min(ticks) < 1:
      p.error(f'--{flag}={getattr(args, flag)}: expected two positive tick counts')
    setattr(args, flag, ticks)
  if args.scaling_repeats < 1 or args.scaling_batch < 0:
    p.error('--scaling_repeats must be >= 1 and --scaling_batch >= 0')
  if args.remat is None:
    args.remat = 'sqrt' if args.scaling or args.scaling_point else 'none'
  args.config_names = names
  return args


def main(argv=None):
  args = parse_args(argv)
  # Cold compiles only: a persistent cache would turn compile times into cache reads.
  jax.config.update('jax_enable_compilation_cache', False)
  if args.scaling_point:  # A --scaling subprocess on GPU/TPU: one tick count, one step.
    env = harness.environment()
    (point,) = measure_ticks(scaling_config(args), [args.scaling_point], args, run_step=True)
    if args.json:
      harness.write_json(args.json, env, args, point=point)
    return
  isolate = args.isolate == 'yes' or (args.isolate == 'auto' and harness.accelerator_present())
  if args.scaling:
    harness.log(f'tick scaling of {args.scaling_config}, isolate={isolate}')
    env, summary = run_scaling(args, isolate)
    if args.json:
      harness.write_json(args.json, env, args, scaling=summary)
    print(format_scaling(env, summary), flush=True)
    return

  harness.log(f'configs {args.config_names}, isolate={isolate}')
  # Isolated, this process leaves the device alone: the environment comes from
  # the first config's subprocess.
  env = None if isolate else harness.environment()
  if env and args.reference:
    env['reference'] = load_reference(args.reference).info()
  if env:
    harness.log(f"device {env['device_kind']}, jax {env['jax']}")
  # At the start of the run, before any config holds memory.
  peak = measure_peak(args, isolate)
  results = []
  for name in args.config_names:
    if isolate:
      child_env, result = run_isolated(name, args)
      env = env or child_env
      results.append(add_rates(result, peak))
    else:
      results.append(run_config(name, args, peak))
    if args.json and env:  # Written after each config, so a long run keeps partial results.
      harness.write_json(args.json, dict(env, matmul_peak=peak), args, results=results)
  env = dict(env or harness.environment(), matmul_peak=peak)
  if args.json:
    harness.write_json(args.json, env, args, results=results)
  print(format_table(env, results, args), flush=True)


if __name__ == '__main__':
  # As ctm_jax.main does. Isolated configs inherit it; the reference's worker
  # gets the user's environment back (hostmem.environ_before_reexec).
  hostmem.reexec_with_huge_pages()
  main()
