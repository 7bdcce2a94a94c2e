"""Optimizer tests: schedules against the reference's definitions and torch's own
schedulers, quantile clipping against autoclip's definition, AdamW against
torch.optim.AdamW."""

import math
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ctm_jax import optim


def _lrs(schedule, n_steps):
  return np.asarray(jax.vmap(schedule)(jnp.arange(n_steps)), np.float64)


def _config(**overrides):
  config = dict(
      lr=1e-3,
      warmup_steps=0,
      training_iterations=100,
      use_scheduler=False,
      scheduler_type='cosine',
      milestones=(8000, 15000, 20000),
      gamma=0.1,
      weight_decay=0.0,
      weight_decay_exclude=(),
      gradient_clipping=-1,
      gradient_clipping_type='quantile',
  )
  config.update(overrides)
  return types.SimpleNamespace(**config)


# ----------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------


def _reference_cosine(lr, warmup_steps, total_steps, n_steps, start=1e-20, eta_min=1e-7):
  """WarmupCosineAnnealingLR step by step, as utils/schedulers.py defines it: a
  recursion on the previous step's LR, in float64."""
  w, s = warmup_steps, total_steps
  out = []
  for k in range(n_steps):
    if k == 0:
      cur = start
    elif k < w:
      cur = cur + (lr - start) / (w - 1)
    elif k == w:
      cur = lr
    elif (k - 1 - s) % (2 * (s - w)) == 0:
      cur = cur + (lr - eta_min) * (1 - math.cos(math.pi / (s - w))) / 2
    else:
      ratio = (1 + math.cos(math.pi * (k - w) / (s - w))) / (
          1 + math.cos(math.pi * (k - w - 1) / (s - w))
      )
      cur = ratio * (cur - eta_min) + eta_min
    out.append(cur)
  return np.asarray(out)


@pytest.mark.parametrize('warmup_steps', [0, 1, 2, 10])
def test_warmup_cosine_matches_reference_recursion(warmup_steps):
  lr, total = 1e-3, 50
  # Past the end: through S + 1 (the reference's special case) and a full period.
  n_steps = total + 2 * (total - warmup_steps) + 10
  expected = _reference_cosine(lr, warmup_steps, total, n_steps)
  got = _lrs(optim.warmup_cosine(lr, warmup_steps, total), n_steps)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-13)


def test_warmup_cosine_long_run():
  # The parity script's schedule, past its end: float32 keeps the relative error small.
  lr, w, s = 1e-4, 500, 200_001
  expected = _reference_cosine(lr, w, s, s + 1000)
  got = _lrs(optim.warmup_cosine(lr, w, s), s + 1000)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_warmup_cosine_landmarks():
  lr, w, s, eta = 1e-3, 10, 50, 1e-7
  got = _lrs(optim.warmup_cosine(lr, w, s), 2 * s)
  np.testing.assert_allclose(got[0], 1e-20, rtol=1e-6)  # warmup start
  np.testing.assert_allclose(got[w - 1], lr, rtol=1e-6)  # ramp ends one step early
  np.testing.assert_allclose(got[w], lr, rtol=1e-6)
  np.testing.assert_allclose(got[(w + s) // 2], eta + (lr - eta) / 2, rtol=1e-6)  # mid-cosine
  np.testing.assert_allclose(got[s], eta, rtol=1e-5)  # the end
  assert got[s + 5] > got[s + 1] > got[s]  # beyond the end it climbs back
  with pytest.raises(ValueError, match='total_steps'):
    optim.warmup_cosine(lr, 50, 50)


def _torch_lrs(make_scheduler, lr, n_steps):
  """The LR of each optimizer step under a torch scheduler, in the reference's
  loop order: read lr, optimizer.step(), scheduler.step()."""
  torch = pytest.importorskip('torch')
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=lr)
  scheduler = make_scheduler(torch, opt)
  out = []
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    for _ in range(n_steps):
      out.append(opt.param_groups[-1]['lr'])
      opt.step()
      scheduler.step()
  return np.asarray(out)


def _warmup_lambda(warmup_steps):
  return lambda k: k / warmup_steps if k < warmup_steps else 1.0


@pytest.mark.parametrize('warmup_steps', [0, 1, 7])
def test_warmup_matches_torch_lambdalr(warmup_steps):
  lr, n = 2e-3, 20
  expected = _torch_lrs(
      lambda torch, opt: torch.optim.lr_scheduler.LambdaLR(opt, _warmup_lambda(warmup_steps)), lr, n
  )
  np.testing.assert_allclose(_lrs(optim.warmup(lr, warmup_steps), n), expected, rtol=1e-6)


@pytest.mark.parametrize(
    'warmup_steps, milestones',
    [(5, (8, 12, 12, 20)), (0, (3, 7)), (10, (4, 15)), (4, ())],
)
def test_warmup_multistep_matches_torch_sequential_lr(warmup_steps, milestones):
  lr, gamma, n = 1e-2, 0.5, 30

  def make(torch, opt):
    # WarmupMultiStepLR's composition of torch's own schedulers.
    sched = torch.optim.lr_scheduler
    warm = sched.LambdaLR(opt, _warmup_lambda(warmup_steps))
    multi = sched.MultiStepLR(opt, [m - warmup_steps for m in milestones], gamma=gamma)
    return sched.SequentialLR(opt, [warm, multi], milestones=[warmup_steps])

  expected = _torch_lrs(make, lr, n)
  got = _lrs(optim.warmup_multistep(lr, warmup_steps, milestones, gamma), n)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_make_schedule_dispatch():
  n = 40
  plain = _config(lr=1e-3, warmup_steps=4)
  np.testing.assert_allclose(_lrs(optim.make_schedule(plain), n), _lrs(optim.warmup(1e-3, 4), n))
  cosine = _config(use_scheduler=True, scheduler_type='cosine', warmup_steps=4)
  np.testing.assert_allclose(
      _lrs(optim.make_schedule(cosine), n), _lrs(optim.warmup_cosine(1e-3, 4, 100), n)
  )
  multi = _config(use_scheduler=True, scheduler_type='multistep', milestones=(10, 20), gamma=0.3)
  np.testing.assert_allclose(
      _lrs(optim.make_schedule(multi), n), _lrs(optim.warmup_multistep(1e-3, 0, (10, 20), 0.3), n)
  )
  with pytest.raises(ValueError, match='scheduler_type'):
    optim.make_schedule(_config(use_scheduler=True, scheduler_type='linear'))
  assert float(optim.current_lr(optim.make_schedule(plain), 2)) == pytest.approx(5e-4)


# ----------------------------------------------------------------------------
# Quantile clipping
# ----------------------------------------------------------------------------


def _reference_quantile_clip(grads_seq, quantile, history_length):
  """autoclip's QuantileClip (per tensor) in numpy: threshold from the previous
  norms only (none on the first step), clip_grad_norm_'s 1e-6, then record the
  pre-clip norm and keep the last history_length."""
  histories = {}
  out = []
  for grads in grads_seq:
    clipped = {}
    for name, g in grads.items():
      norm = np.linalg.norm(g.astype(np.float64))
      history = histories.get(name)
      threshold = np.inf if history is None else np.quantile(history, quantile)
      clipped[name] = g * min(1.0, threshold / (norm + 1e-6))
      histories[name] = (([] if history is None else history) + [norm])[-history_length:]
    out.append(clipped)
  return out


def _grad_sequence(norms_a, norms_b, seed=0):
  """Two tensors whose gradients have the given norms, step by step."""
  rng = np.random.default_rng(seed)
  seq = []
  for na, nb in zip(norms_a, norms_b):
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(5,))
    seq.append(
        {
            'a': (a / np.linalg.norm(a) * na).astype(np.float32),
            'b': (b / np.linalg.norm(b) * nb).astype(np.float32),
        }
    )
  return seq


@pytest.mark.parametrize('quantile, history_length', [(0.9, 4), (0.5, 3), (0.25, 100), (1.0, 1)])
def test_quantile_clip_matches_definition(quantile, history_length):
  seq = _grad_sequence([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [0.1, 2, 0.2, 8, 0.3, 0.3, 7, 1, 1, 9])
  expected = _reference_quantile_clip(seq, quantile, history_length)
  tx = optim.quantile_clip(quantile, history_length)
  update = jax.jit(tx.update)
  state = tx.init(jax.tree.map(jnp.zeros_like, seq[0]))
  for k, (grads, want) in enumerate(zip(seq, expected)):
    got, state = update(jax.tree.map(jnp.asarray, grads), state)
    if k == 0:  # no history yet: untouched
      np.testing.assert_array_equal(got['a'], grads['a'])
    for name in grads:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=f'{k} {name}')
  assert int(state.count) == len(seq)
  # The ring buffer holds the last history_length pre-clip norms (in rotated order).
  last = sorted(np.linalg.norm(g['b']) for g in seq[-history_length:])
  n_kept = min(history_length, len(seq))
  np.testing.assert_allclose(np.sort(state.history['b'])[-n_kept:], last, rtol=1e-5)


def test_quantile_clip_state_is_fixed_shape():
  params = {'w': jnp.zeros((7, 3)), 'b': jnp.zeros((3,), jnp.bfloat16)}
  tx = optim.quantile_clip(0.9)
  state = jax.eval_shape(tx.init, params)
  assert state.count.shape == () and state.count.dtype == jnp.int32
  assert jax.tree.map(lambda h: (h.shape, h.dtype), state.history) == {
      'w': ((1000,), jnp.float32),
      'b': ((1000,), jnp.float32),
  }
  grads = jax.tree.map(jnp.ones_like, params)
  out, new_state = jax.jit(tx.update)(grads, tx.init(params))
  assert out['b'].dtype == jnp.bfloat16
  assert jax.tree.map(jnp.shape, new_state) == jax.tree.map(jnp.shape, state)


# ----------------------------------------------------------------------------
# AdamW against torch
# ----------------------------------------------------------------------------

_SHAPES = {'dense': {'kernel': (3, 4), 'bias': (4,)}, 'norm': {'scale': (4,)}}


def _params_and_grads(n_steps, seed=0, grad_scales=None):
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda s: rng.normal(size=s).astype(np.float32),
      _SHAPES,
      is_leaf=lambda x: isinstance(x, tuple),
  )
  grads = []
  for k in range(n_steps):
    scale = 1.0 if grad_scales is None else grad_scales[k]
    grads.append(
        jax.tree.map(lambda p: (scale * rng.normal(size=p.shape)).astype(np.float32), params)
    )
  return params, grads


def _flat(tree):
  return {optim.param_path(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _run_optax(tx, params, grads_seq):
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for grads in grads_seq:
    params, state = step(params, state, jax.tree.map(jnp.asarray, grads))
  return _flat(params)


def _run_torch(params, grads_seq, lr, warmup_steps, weight_decay, exclude=(), clip=None):
  """torch.optim.AdamW + the warmup LambdaLR, in the reference's loop order.
  `clip(named_params, state)` runs on the gradients before the optimizer step."""
  torch = pytest.importorskip('torch')
  named = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in _flat(params).items()}
  decay = [p for k, p in named.items() if not any(s in k for s in exclude)]
  no_decay = [p for k, p in named.items() if any(s in k for s in exclude)]
  groups = [{'params': decay, 'weight_decay': weight_decay}]
  if no_decay:
    groups.append({'params': no_decay, 'weight_decay': 0.0})
  opt = torch.optim.AdamW(groups, lr=lr, eps=1e-8)
  scheduler = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_lambda(warmup_steps))
  clip_state = {}
  for grads in grads_seq:
    for k, g in _flat(grads).items():
      named[k].grad = torch.tensor(g)
    if clip is not None:
      clip(named, clip_state)
    opt.step()
    opt.zero_grad(set_to_none=True)
    scheduler.step()
  return {k: p.detach().numpy() for k, p in named.items()}


def _assert_same(got, expected, tol=1e-6):
  assert got.keys() == expected.keys()
  for k in got:
    np.testing.assert_allclose(np.asarray(got[k]), expected[k], rtol=0, atol=tol, err_msg=k)


@pytest.mark.parametrize('exclude', [(), ('bias', 'norm/')])
def test_adamw_matches_torch(exclude):
  lr, warmup_steps, wd, n = 1e-2, 2, 0.1, 5
  params, grads = _params_and_grads(n)
  config = _config(lr=lr, warmup_steps=warmup_steps, weight_decay=wd, weight_decay_exclude=exclude)
  got = _run_optax(optim.make_optimizer(config), params, grads)
  expected = _run_torch(params, grads, lr, warmup_steps, wd, exclude)
  _assert_same(got, expected)
  # The mask matters: excluded leaves differ from a run that decays everything.
  if exclude:
    all_decayed = _run_torch(params, grads, lr, warmup_steps, wd)
    assert not np.allclose(expected['dense/bias'], all_decayed['dense/bias'], atol=1e-6)
    np.testing.assert_allclose(expected['dense/kernel'], all_decayed['dense/kernel'])


def _torch_quantile_clip(quantile, history_length):
  """Per-tensor quantile clipping in torch, written from autoclip's definition."""
  torch = pytest.importorskip('torch')

  def clip(named, state):
    for name, p in named.items():
      history = state.get(name)
      threshold = math.inf if history is None else torch.quantile(history, quantile)
      norm = torch.nn.utils.clip_grad_norm_([p], max_norm=threshold)
      grown = norm.reshape(1) if history is None else torch.cat([history, norm.reshape(1)])
      state[name] = grown[-history_length:]

  return clip


def test_adamw_with_quantile_clip_matches_torch():
  lr, warmup_steps, wd, n = 1e-2, 1, 0.05, 8
  params, grads = _params_and_grads(n, seed=1, grad_scales=[1, 3, 0.2, 5, 1, 8, 0.5, 2])
  config = _config(lr=lr, warmup_steps=warmup_steps, weight_decay=wd, gradient_clipping=0.5)
  got = _run_optax(optim.make_optimizer(config), params, grads)
  expected = _run_torch(params, grads, lr, warmup_steps, wd, clip=_torch_quantile_clip(0.5, 1000))
  unclipped = _run_torch(params, grads, lr, warmup_steps, wd)
  _assert_same(got, expected)
  assert not np.allclose(expected['dense/kernel'], unclipped['dense/kernel'], atol=1e-5)


def test_adamw_with_norm_clip_matches_torch():
  torch = pytest.importorskip('torch')
  lr, warmup_steps, wd, n = 1e-2, 0, 0.0, 5
  params, grads = _params_and_grads(n, seed=2, grad_scales=[1, 3, 0.2, 5, 1])
  config = _config(
      lr=lr, warmup_steps=warmup_steps, gradient_clipping=2.0, gradient_clipping_type='norm'
  )

  def clip(named, state):
    del state
    torch.nn.utils.clip_grad_norm_(list(named.values()), max_norm=2.0)

  got = _run_optax(optim.make_optimizer(config), params, grads)
  _assert_same(got, _run_torch(params, grads, lr, warmup_steps, wd, clip=clip))


def test_weight_decay_mask_paths():
  params = {'backbone': {'Conv_0': {'kernel': 0, 'bias': 0}}, 'start_activated_state': 0}
  mask = optim.weight_decay_mask(('bias', 'start'))(params)
  assert mask == {
      'backbone': {'Conv_0': {'kernel': True, 'bias': False}},
      'start_activated_state': False,
  }


def test_make_optimizer_rejects_unknown_clip_type():
  with pytest.raises(ValueError, match='gradient_clipping_type'):
    optim.make_optimizer(_config(gradient_clipping=1.0, gradient_clipping_type='value'))
