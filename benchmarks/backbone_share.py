"""The ResNet backbone's share of the CIFAR-10 and maze train steps, ours and the reference's.

Usage (from the repo root):
  python -m benchmarks.backbone_share --reference=/tmp/ctm_ref
  python -m benchmarks.backbone_share --configs=cifar10_b32 --repeats=9 \
      --reference=/tmp/ctm_ref --variants=default,ynn_conv --json=/tmp/share.json
  python -m benchmarks.backbone_share --main_configs= --variants=default,ynn_conv \
      --variant_calls=bb_fwdbwd,step   # only the XLA options, on the train step too

What is timed, per config of model_bench.CONFIGS (default cifar10_b32 and
maze_b16; float32, remat 'none', unroll 1, as model_bench runs them):

  step        ours: the trainer's own step (`harness.build(config).run.
              train_step`, state donated) on model_bench's synthetic batch; the
              reference's: `reference_adapter.ReferenceTrainStep.step` (its
              script's zero_grad, forward, loss, backward, clipping, AdamW,
              scheduler) on the same batch.
  bb fwd+bwd  the backbone alone, forward and backward, on the same batch:
              the 1x1 `initial_rgb` conv and the ResNet trunk `backbone`
              (`ctm_jax/models/ctm.py:featurise` up to the backbone's output;
              the reference's `initial_rgb` and `backbone` submodules), in
              training mode (batch statistics, running averages updated), with
              a loss sum(features * C) for a fixed random cotangent C; ours is
              jitted `value_and_grad` w.r.t. the two modules' params (the
              model's own subtree, batch_stats mutable), the reference's
              `backward(C)` into the parameters' .grad (set to None first).
              The input takes no gradient on either side, as in the step.
  bb fwd      the backbone's forward alone in training mode (ours jitted,
              the reference's under torch.no_grad()).

  share = bb fwd+bwd / step; the remainder (step - bb fwd+bwd) is the rest of
  the step: kv projection, the tick loop, loss, optimiser.

Each side runs in a worker process of its own (the reference with the user's
environment, as model_bench runs it; ours with the huge-page allocator this
script re-execs into, as ctm_jax.main does), one command at a time. The calls
are timed interleaved: every round runs every call once, in reversed order
every other round, after --warmup rounds; each turn runs its call twice and
times the second (the first absorbs the cost of switching from the other
process, as model_bench's --reference does). Times are each worker's own wall
time of its call (blocked until ready). Torch runs --ref_threads threads.

--variants then times our bb fwd+bwd under XLA options (each in a worker of
its own, started with that XLA_FLAGS or jax_default_matmul_precision): first
every variant compiles and reports a fingerprint of its compiled program; a
variant whose program is the default's is reported as "same program" and not
timed; the others are timed interleaved with the default (with
--variant_calls=bb_fwdbwd,step, the trainer's step under that option as well).
The 'layout' entry times one 3x3 64->64 convolution at layer1's shape (fwd +
input and weight gradients) in NHWC (ours) against NCHW/OIHW dimension numbers.

Before any timing the script waits (--wait_quiet_s) until no other process
matches `pgrep -f "pytest|compile_check"` and records whether the machine was
quiet, and lists any that ran during each timing phase.
"""

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import harness

REPO = harness.REPO
log = harness.log

DEFAULT_CONFIGS = ('cifar10_b32', 'maze_b16')
# name -> (XLA_FLAGS, jax_default_matmul_precision or None). Only flags this
# jaxlib (0.10.2) accepts (`XLA_FLAGS=--help`); --xla_cpu_use_thunk_runtime is
# marked "Deprecated" there and left out.
VARIANTS = {
    # The trainer's options (compiling.compiler_options: XLA's own
    # convolutions); a variant's XLA_FLAGS replaces them.
    'default': ('', None),
    # XLA:CPU's own default: convolutions in YNNPACK (`__ynn_fusion`).
    'ynn_conv': ('--xla_cpu_experimental_ynn_fusion_type=+individual_convolution', None),
    'eigen_conv': ('--xla_cpu_experimental_ynn_fusion_type=-individual_convolution', None),
    'ynn_eltwise': ('--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce', None),
    'no_xnnpack': ('--xla_cpu_use_xnnpack=false', None),
    'xnn_graph_greedy': (
        '--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY',
        None,
    ),
    'onednn': ('--xla_cpu_use_onednn=true', None),
    'fast_math': ('--xla_cpu_enable_fast_math=true', None),
    'precision_highest': ('', 'highest'),
    'precision_bf16': ('', 'bfloat16'),
}
QUIET_PATTERN = 'pytest|compile_check'


# ----------------------------------------------------------------------------- workers


class Worker:
  """A worker process of this script; `call(cmd)` runs one command there and returns its reply."""

  def __init__(self, argv, env, wait=True):
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'benchmarks.backbone_share', *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    self.ready = self._read() if wait else None

  def wait_ready(self):
    """For `wait=False`: the worker's first reply (it has built and compiled)."""
    if self.ready is None:
      self.ready = self._read()
    return self.ready

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'worker exited with {self.proc.wait()}; see stderr')
    reply = json.loads(line)
    if 'error' in reply:
      raise RuntimeError(f'worker: {reply["error"]}')
    return reply

  def call(self, cmd):
    self.proc.stdin.write(cmd + '\n')
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait()


def serve(commands, ready):
  """Worker loop: prints `ready`, then one JSON reply per stdin line (a command name)."""
  out, sys.stdout = sys.stdout, sys.stderr  # anything else printed goes to stderr
  print(json.dumps(ready), file=out, flush=True)
  for line in sys.stdin:
    name = line.strip()
    try:
      t0 = time.perf_counter()
      extra = commands[name]() or {}
      reply = dict(time_s=time.perf_counter() - t0, **extra)
    except Exception as e:  # pylint: disable=broad-except
      reply = dict(error=f'{name}: {type(e).__name__}: {e}')
    print(json.dumps(reply), file=out, flush=True)


def jax_worker(args):
  """Ours: the trainer's step, the backbone's fwd+bwd and fwd, the layout probe."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from benchmarks import model_bench  # pylint: disable=g-import-not-at-top
  from ctm_jax import sharding  # pylint: disable=g-import-not-at-top
  from ctm_jax import compiling  # pylint: disable=g-import-not-at-top
  from ctm_jax.models import backbones  # pylint: disable=g-import-not-at-top
  from ctm_jax.models import ctm as ctm_lib  # pylint: disable=g-import-not-at-top

  jax.config.update('jax_enable_compilation_cache', False)
  if args.precision:
    jax.config.update('jax_default_matmul_precision', args.precision)
  opts = argparse.Namespace(remat='none', dtype='float32', unroll=1)
  config = model_bench.bench_config(args.worker_config, opts)
  bench = harness.build(config)
  m = config.model

  class Backbone(nn.Module):
    """featurise's initial_rgb + backbone, with the model's module names."""

    @nn.compact
    def __call__(self, x, train):
      x = ctm_lib.initial_rgb(self, x)
      return backbones.make_backbone(
          self.backbone_type, self.d_input, self.dtype, remat=self.backbone_remat, name='backbone'
      )(x, train=train)

    backbone_type = m.backbone_type
    d_input = m.d_input
    dtype = jnp.float32
    backbone_remat = m.get('backbone_remat', 'none')

  module = Backbone()
  mesh_ctx = jax.set_mesh(bench.mesh)
  mesh_ctx.__enter__()
  batch = harness.device_batch(bench)
  x = bench.task.model_inputs(batch)

  if args.full:  # the trainer's state; the backbone's variables are its subtree
    state = bench.run.init()
    params = {k: state.params[k] for k in ('initial_rgb', 'backbone')}
    bstats = {'backbone': state.batch_stats['backbone']}
    mine = module.init(jax.random.key(0), x, train=False)
    same = jax.tree.structure(mine['params']) == jax.tree.structure(params) and jax.tree.structure(
        mine['batch_stats']
    ) == jax.tree.structure(bstats)
    if not same:
      raise ValueError('the backbone wrapper does not match the model params subtree')
    # Copies: the step donates the state's buffers.
    params, bstats = jax.tree.map(jnp.copy, (params, bstats))
  else:
    variables = module.init(jax.random.key(0), x, train=False)
    params, bstats = variables['params'], variables['batch_stats']

  feats = jax.eval_shape(lambda: module.apply({'params': params, 'batch_stats': bstats}, x, False))
  cot = jax.random.normal(jax.random.key(1), feats.shape, feats.dtype)

  def fwd(p, bs, x):
    with sharding.logical_rules():
      return module.apply({'params': p, 'batch_stats': bs}, x, True, mutable=['batch_stats'])

  def loss(p, bs, x, c):
    out, upd = fwd(p, bs, x)
    return jnp.sum(out * c), upd['batch_stats']

  # The trainer's XLA options (its convolution kernels), as its step has them.
  options = compiling.compiler_options()
  fwd_c = jax.jit(fwd, compiler_options=options).lower(params, bstats, x).compile()
  bb_c = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=options)
  bb_c = bb_c.lower(params, bstats, x, cot).compile()
  text = re.sub(r', metadata=\{[^}]*\}', '', bb_c.as_text())
  fingerprint = hashlib.sha256(text.encode()).hexdigest()[:12]
  ops = sorted(set(re.findall(r'kind=k\w+|__\w+_fusion|custom_call_target="[^"]+"', text)))

  def blocking(fn, *fn_args):
    return lambda: jax.block_until_ready(fn(*fn_args)) and None

  commands = {
      'bb_fwdbwd': blocking(bb_c, params, bstats, x, cot),
      'bb_fwd': blocking(fwd_c, params, bstats, x),
  }

  # Layout probe: layer1's first 3x3 conv (64 -> 64 channels), fwd + both gradients.
  b, h, w = x.shape[0], -(-x.shape[1] // 2), -(-x.shape[2] // 2)
  k = jax.random.split(jax.random.key(2), 3)

  def conv_probe(dims, xs, ws, ys):
    xin, win, ct = (jax.random.normal(kk, s) for kk, s in zip(k, (xs, ws, ys)))

    def f(a, bb):
      y = jax.lax.conv_general_dilated(a, bb, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims)
      return jnp.sum(y * ct)

    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))  # compiled at its first (untimed) call
    return blocking(fn, xin, win)

  commands['conv_nhwc'] = conv_probe(
      ('NHWC', 'HWIO', 'NHWC'), (b, h, w, 64), (3, 3, 64, 64), (b, h, w, 64)
  )
  commands['conv_nchw'] = conv_probe(
      ('NCHW', 'OIHW', 'NCHW'), (b, 64, h, w), (64, 64, 3, 3), (b, 64, h, w)
  )

  ready = dict(fingerprint=fingerprint, ops=ops, jax=jax.__version__, pid=os.getpid())
  if args.full:
    step_c, lower_s, compile_s = harness.aot_compile(
        harness.train_step(bench), state, batch
    )
    ready['step_compile_s'] = lower_s + compile_s
    train = harness.donated_steps(step_c, state, batch)
    del state

    def step():
      metrics = train()
      return dict(loss=float(metrics['loss']), finite=bool(metrics['finite']))

    commands['step'] = step
    spec = model_bench.reference_spec(config, bench.task)
    ready['reference_spec'] = spec
    with open(os.path.join(args.worker_dir, 'spec.json'), 'w') as f:
      json.dump(spec, f)
    np.savez(
        os.path.join(args.worker_dir, 'batch.npz'),
        **{key: np.asarray(v) for key, v in jax.device_get(batch).items()},
    )
  serve(commands, ready)


def torch_worker(args):
  """The reference: its script's train step, its backbone's fwd+bwd and fwd."""
  from benchmarks import reference_adapter  # pylint: disable=g-import-not-at-top

  with open(os.path.join(args.worker_dir, 'spec.json')) as f:
    spec = json.load(f)
  batch = dict(np.load(os.path.join(args.worker_dir, 'batch.npz')))
  ref = reference_adapter.Reference(args.reference)
  torch = ref.torch
  torch.set_num_threads(args.ref_threads)
  ts = reference_adapter.ReferenceTrainStep(ref, spec, batch)
  model = ts.model
  bb_params = list(model.initial_rgb.parameters()) + list(model.backbone.parameters())
  with torch.no_grad():
    feats = model.backbone(model.initial_rgb(ts.x))
  gen = torch.Generator().manual_seed(1)
  cot = torch.randn(feats.shape, generator=gen)

  def bb_fwdbwd():
    for p in bb_params:
      p.grad = None
    out = model.backbone(model.initial_rgb(ts.x))
    out.backward(cot)

  def bb_fwd():
    with torch.no_grad():
      model.backbone(model.initial_rgb(ts.x))

  def step():
    loss = ts.step()
    return dict(loss=loss, finite=bool(np.isfinite(loss)))

  ready = dict(
      torch=torch.__version__,
      threads=torch.get_num_threads(),
      n_params=ts.n_params,
      backbone_params=sum(p.numel() for p in bb_params),
      features=list(feats.shape),
      optimizer=ts.optimizer_text,
  )
  serve(dict(step=step, bb_fwdbwd=bb_fwdbwd, bb_fwd=bb_fwd), ready)


# ----------------------------------------------------------------------------- parent


def wait_quiet(max_s, poll_s=30):
  """Waits until `pgrep -af QUIET_PATTERN` finds nothing, up to max_s.

  Returns (quiet, seconds waited, the matching processes left).
  """
  t0 = time.time()
  while True:
    hits = others_busy()
    if not hits:
      return True, time.time() - t0, []
    if time.time() - t0 >= max_s:
      return False, time.time() - t0, hits
    log(f'waiting for a quiet machine: {len(hits)} matching processes, e.g. {hits[0][:100]}')
    time.sleep(poll_s)


def others_busy():
  """The processes matching QUIET_PATTERN, other than this script's."""
  out = subprocess.run(
      ['pgrep', '-af', QUIET_PATTERN], capture_output=True, text=True, check=False
  ).stdout
  return [l for l in out.splitlines() if l and 'backbone_share' not in l]


def time_in_workers(calls, warmup, repeats):
  """({key: [worker-measured s]}, {key: [replies]}) of `repeats` rounds after `warmup`.

  `calls` maps a key to (worker, command).

  Each round runs every call twice and keeps the second time; the order is
  reversed every other round (harness.time_interleaved's rounds, with the
  times each worker measures around its own command, not this process's).
  """
  keys = list(calls)
  times = {key: [] for key in keys}
  replies = {key: [] for key in keys}
  for i in range(warmup + repeats):
    for key in keys[:: -1 if i % 2 else 1]:
      worker, cmd = calls[key]
      worker.call(cmd)
      reply = worker.call(cmd)
      replies[key].append(reply)
      if i >= warmup:
        times[key].append(reply['time_s'])
  return times, replies


def summary(ts):
  return dict(median=statistics.median(ts), min=min(ts), times=ts)


def jax_env(flags, base):
  env = dict(base)
  joined = ' '.join(f for f in (env.get('XLA_FLAGS', ''), flags) if f)
  if joined:
    env['XLA_FLAGS'] = joined
  return env


def measure_config(name, args, tmp):
  """Phase 1: ours and the reference, step / bb fwd+bwd / bb fwd interleaved."""
  from ctm_jax import hostmem  # pylint: disable=g-import-not-at-top

  wdir = os.path.join(tmp, name)
  os.makedirs(wdir, exist_ok=True)
  log(f'{name}: our worker (init, compiles)')
  ours = Worker(
      ['--_worker=jax', f'--worker_config={name}', '--full', f'--worker_dir={wdir}'], None
  )
  ready = ours.ready
  log(
      f'{name}: ours ready (step compile {ready["step_compile_s"]:.1f}s, '
      f'bb program {ready["fingerprint"]})'
  )
  workers = [ours]
  result = dict(config=name, ours_ready=ours.ready)
  try:
    calls = {
        'ours_step': (ours, 'step'),
        'ours_bb_fwdbwd': (ours, 'bb_fwdbwd'),
        'ours_bb_fwd': (ours, 'bb_fwd'),
    }
    if args.reference:
      log(f'{name}: reference worker')
      ref = Worker(
          [
              '--_worker=torch',
              f'--reference={args.reference}',
              f'--worker_dir={wdir}',
              f'--ref_threads={args.ref_threads}',
          ],
          hostmem.environ_before_reexec(),
      )
      workers.append(ref)
      result['ref_ready'] = ref.ready
      calls.update(
          ref_step=(ref, 'step'), ref_bb_fwdbwd=(ref, 'bb_fwdbwd'), ref_bb_fwd=(ref, 'bb_fwd')
      )
    busy_before = others_busy()
    log(f'{name}: timing {list(calls)} interleaved ({args.warmup} + {args.repeats} rounds)')
    times, replies = time_in_workers(calls, args.warmup, args.repeats)
    busy_after = others_busy()
    for key, ts in times.items():
      result[key] = summary(ts)
    for key in ('ours_step', 'ref_step'):
      if key in replies and not all(r['finite'] for r in replies[key]):
        losses = [r['loss'] for r in replies[key]]
        raise FloatingPointError(f'{name}: {key} non-finite loss {losses}')
    if 'ref_step' in replies:
      result['first_loss'] = dict(
          ours=replies['ours_step'][0]['loss'], ref=replies['ref_step'][0]['loss']
      )
    result['others_running'] = sorted(set(busy_before + busy_after))
  finally:
    for w in workers:
      w.close()
  return result


def measure_variants(name, args, tmp):
  """Phase 2: our bb fwd+bwd under each XLA option, and the layout probe."""
  wanted = [v for v in args.variants.split(',') if v]
  if not wanted:
    return {}
  if 'default' not in wanted:
    wanted.insert(0, 'default')
  workers, out = {}, {}
  try:
    # Started together (their builds and compiles overlap), then timed one call at a time.
    log(f'{name}: variant workers {wanted}')
    started = {}
    with_step = 'step' in args.variant_calls.split(',')
    for v in wanted:
      flags, precision = VARIANTS[v]
      wdir = os.path.join(tmp, f'{name}_{v}')
      os.makedirs(wdir, exist_ok=True)
      argv = ['--_worker=jax', f'--worker_config={name}', f'--worker_dir={wdir}']
      if precision:
        argv.append(f'--precision={precision}')
      if with_step:
        argv.append('--full')
      started[v] = Worker(argv, jax_env(flags, os.environ), wait=False)
    for v, w in started.items():
      flags, precision = VARIANTS[v]
      try:
        ready = w.wait_ready()
      except RuntimeError as e:
        w.close()
        out[v] = dict(flags=flags, precision=precision, error=str(e))
        continue
      workers[v] = w
      out[v] = dict(
          flags=flags, precision=precision, fingerprint=ready['fingerprint'], ops=ready['ops']
      )
    base = out['default']['fingerprint']
    calls = {}
    for v, w in workers.items():
      same = v != 'default' and out[v]['fingerprint'] == base
      out[v]['same_program'] = same
      if not same:
        calls[v] = (w, 'bb_fwdbwd')
        if with_step:
          calls[f'{v}/step'] = (w, 'step')
    calls['layout_nhwc'] = (workers['default'], 'conv_nhwc')
    calls['layout_nchw'] = (workers['default'], 'conv_nchw')
    busy = others_busy()
    log(f'{name}: timing variants {list(calls)} interleaved')
    times, replies = time_in_workers(calls, args.warmup, args.repeats)
    busy += others_busy()
    for key, ts in times.items():
      v, _, call = key.partition('/')
      if call:  # the variant's train step
        out[v]['step'] = summary(ts)
        out[v]['step_losses'] = [r['loss'] for r in replies[key]]
      else:
        out.setdefault(key, {}).update(summary(ts))
    out['others_running'] = sorted(set(busy))
  finally:
    for w in workers.values():
      w.close()
  return out


def fmt(s):
  return f'{s["median"]:.3f} ({s["min"]:.3f})'


def tables(results):
  lines = [
      'Times in s: median (min) of the timed interleaved calls.',
      '',
      '| config | ours step s | ours backbone fwd+bwd s | share | reference step s '
      '| reference backbone fwd+bwd s | share | backbone speedup ours/ref |',
      '|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    if 'ours_step' not in r:
      continue
    o_s, o_b = r['ours_step'], r['ours_bb_fwdbwd']
    row = [r['config'], fmt(o_s), fmt(o_b), f'{o_b["median"] / o_s["median"]:.0%}']
    if 'ref_step' in r:
      r_s, r_b = r['ref_step'], r['ref_bb_fwdbwd']
      row += [fmt(r_s), fmt(r_b), f'{r_b["median"] / r_s["median"]:.0%}',
              f'{r_b["median"] / o_b["median"]:.2f}x']
    else:
      row += ['-'] * 4
    lines.append('| ' + ' | '.join(row) + ' |')
  lines += [
      '',
      '| config | ours bb fwd s | ref bb fwd s | bb fwd speedup | step speedup '
      '| ours remainder s | ref remainder s | remainder speedup |',
      '|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    if 'ref_step' not in r:
      continue
    med = lambda k: r[k]['median']
    o_rem = med('ours_step') - med('ours_bb_fwdbwd')
    r_rem = med('ref_step') - med('ref_bb_fwdbwd')
    lines.append(
        f'| {r["config"]} | {fmt(r["ours_bb_fwd"])} | {fmt(r["ref_bb_fwd"])} '
        f'| {med("ref_bb_fwd") / med("ours_bb_fwd"):.2f}x '
        f'| {med("ref_step") / med("ours_step"):.2f}x '
        f'| {o_rem:.3f} | {r_rem:.3f} | {r_rem / o_rem:.2f}x |'
    )
  variant_rows = []
  for r in results:
    for v, d in r.get('variants', {}).items():
      if v.startswith('layout') or v == 'others_running':
        continue
      if 'error' in d:
        status = f'error: {d["error"][:60]}'
        cell = '-'
      elif d.get('same_program'):
        status, cell = 'same program as default', '-'
      else:
        base = r['variants']['default']['median']
        status = f'{d["median"] / base:.2f}x of default'
        cell = fmt(d)
        if 'step' in d:
          base_step = r['variants']['default']['step']['median']
          status += f'; step {fmt(d["step"])} s, {d["step"]["median"] / base_step:.2f}x of default'
      precision = d.get('precision') and f'precision={d["precision"]}'
      what = ' '.join(x for x in (d.get('flags'), precision) if x)
      variant_rows.append(f'| {r["config"]} | {v} | `{what or "-"}` | {cell} | {status} |')
    if 'layout_nhwc' in r.get('variants', {}):
      n, c = r['variants']['layout_nhwc'], r['variants']['layout_nchw']
      variant_rows.append(
          f'| {r["config"]} | layer1 3x3 conv fwd+bwd | NHWC vs NCHW | {fmt(n)} vs {fmt(c)} '
          f'| NCHW {c["median"] / n["median"]:.2f}x of NHWC |'
      )
  if variant_rows:
    lines += [
        '',
        '| config | variant | option | ours bb fwd+bwd s | vs default |',
        '|---|---|---|---|---|',
    ]
    lines += variant_rows
  return '\n'.join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--configs', default=','.join(DEFAULT_CONFIGS), help='model_bench.CONFIGS names')
  p.add_argument('--repeats', type=int, default=7, help='timed rounds (>= 7 for the report)')
  p.add_argument('--warmup', type=int, default=1, help='untimed rounds first')
  p.add_argument('--reference', default='', help='checkout of SakanaAI/continuous-thought-machines')
  p.add_argument(
      '--ref_threads', type=int, default=2, help='torch.set_num_threads in the reference worker'
  )
  p.add_argument(
      '--variants',
      default=','.join(VARIANTS),
      help=f'XLA options to try, of {list(VARIANTS)}; "" for none',
  )
  p.add_argument(
      '--variant_calls',
      default='bb_fwdbwd',
      help='what variants time: bb_fwdbwd, or bb_fwdbwd,step',
  )
  p.add_argument(
      '--main_configs',
      default=None,
      help='configs of --configs that run the ours/reference phase (default all)',
  )
  p.add_argument(
      '--wait_quiet_s', type=float, default=1500, help='wait this long at most for a quiet machine'
  )
  p.add_argument('--json', default='', help='write the results here')
  # Worker-only flags.
  p.add_argument('--_worker', default='', choices=('', 'jax', 'torch'), help=argparse.SUPPRESS)
  p.add_argument('--worker_config', default='', help=argparse.SUPPRESS)
  p.add_argument('--worker_dir', default='', help=argparse.SUPPRESS)
  p.add_argument('--full', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--precision', default='', help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(args):
  for v in (v for v in args.variants.split(',') if v):
    if v not in VARIANTS:
      raise SystemExit(f'--variants: unknown {v!r}; known {list(VARIANTS)}')
  quiet, waited, hits = wait_quiet(args.wait_quiet_s)
  still = f'; still running: {hits[0]}' if hits else ''
  log(f'machine quiet: {quiet} (waited {waited:.0f}s){still}')
  t0 = time.time()
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    main_configs = args.configs if args.main_configs is None else args.main_configs
    for name in args.configs.split(','):
      if name in main_configs.split(','):
        result = measure_config(name, args, tmp)
      else:
        result = dict(config=name)
      result['variants'] = measure_variants(name, args, tmp)
      results.append(result)
  env = dict(
      date=time.strftime('%Y-%m-%d %H:%M'),
      quiet_at_start=quiet,
      waited_s=waited,
      others_during=sorted(
          set(
              h
              for r in results
              for h in r.get('others_running', []) + r['variants'].get('others_running', [])
          )
      ),
      run_s=time.time() - t0,
      cpus=os.cpu_count(),
  )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(env=env, results=results), f, indent=1)
  others = env['others_during'] or 'none'
  log(f'run {env["run_s"]:.0f}s; other matching processes during timing: {others}')
  print(tables(results), flush=True)


if __name__ == '__main__':
  _args = parse_args()
  if _args._worker == 'jax':  # pylint: disable=protected-access
    jax_worker(_args)
  elif _args._worker == 'torch':  # pylint: disable=protected-access
    torch_worker(_args)
  else:
    from ctm_jax import hostmem  # pylint: disable=g-import-not-at-top

    # As ctm_jax.main and model_bench do; our workers inherit it, the reference's
    # worker gets the user's environment back (hostmem.environ_before_reexec).
    hostmem.reexec_with_huge_pages()
    main(_args)
