"""Deferred weight gradients: each shared weight's gradient once, after the backward scan.

Autodiff of the tick scan computes the gradient of every weight the ticks share
inside the backward scan: one contraction over the batch per tick, added to
an accumulator tick by tick. With `deferred_grads` the heavy matmuls (synapses,
query, attention projections, NLMs, output projection) multiply by their
weight as a constant (`layers.deferred_matmul`); autodiff of the scan then
returns, per tick, the cotangent of each matmul's output (that of a zero
'probes' input added to it), the forward records each matmul's input
('deferred' collection), and after the backward scan each weight's gradient is
one contraction over ticks x batch, mapped onto the layer's parameters
(`effective_weight`: a cast, or the NLM's transpose and temperature).

Dimensions: N positions (ticks x batch, and neurons' batch), D neurons,
I / O a matmul's input / output width.
"""

import jax
import jax.numpy as jnp

from ctm_jax.models import layers
from ctm_jax.models import nlm

# Per layer kind: the parameter taken out of autodiff, and the parameters its
# `effective_weight` reads (which the deferred contraction's gradient reaches).
_DEFERRED_WEIGHT = {layers.Linear: 'kernel', nlm.SuperLinear: 'w1'}
_WEIGHT_INPUTS = {layers.Linear: ('kernel',), nlm.SuperLinear: ('w1', 'temperature')}


def _layer_kind(params):
  return nlm.SuperLinear if 'w1' in params else layers.Linear


def _paths(tree, prefix=()):
  """Paths of the dicts holding an 'x' leaf (the recorded layers)."""
  if 'x' in tree and not isinstance(tree['x'], dict):
    yield prefix
    return
  for key, sub in tree.items():
    if isinstance(sub, dict):
      yield from _paths(sub, prefix + (key,))


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _with(tree, path, value):
  """A copy of nested dict `tree` with `value` at `path`."""
  if not path:
    return value
  return {**tree, path[0]: _with(tree[path[0]], path[1:], value)}


def _weight_gradient(kind, x, dy):
  """The effective weight's gradient: x's and dy's positions contracted, float32."""
  f32 = jnp.float32
  if kind is nlm.SuperLinear:
    # x (..., D, B, I), dy (..., D, B, O): ticks and batch are the positions.
    # (D, I, N) @ (D, N, O) is the batched matmul layout XLA's CPU dots run fastest.
    d, b, i = x.shape[-3:]
    x_DxIxN = jnp.transpose(x.reshape(-1, d, b, i), (1, 3, 0, 2)).reshape(d, i, -1)
    dy_DxNxO = jnp.swapaxes(dy.reshape(-1, d, b, dy.shape[-1]), 0, 1).reshape(d, -1, dy.shape[-1])
    return jnp.einsum('din,dno->dio', x_DxIxN, dy_DxNxO, preferred_element_type=f32)
  x_NxI = x.reshape(-1, x.shape[-1])
  dy_NxO = dy.reshape(-1, dy.shape[-1])
  return jnp.einsum('ni,no->io', x_NxI, dy_NxO, preferred_element_type=f32)


def scan(plain, deferring, params, args, rngs):
  """`plain.apply({'params': params}, *args, rngs=rngs)` (a scanned tick module,
  unbound), whose parameter gradients come from `deferring` (the same module
  with `defer=True`) as described above.

  Returns the scan's (final state, per-tick outputs). `args` are the scan's
  positional inputs (state, per-tick inputs, fixed inputs, synch params);
  `rngs` its rng dict (may be empty).
  """
  shapes = jax.eval_shape(
      lambda p, a, r: deferring.apply({'params': p}, *a, rngs=r, mutable=['probes', 'deferred'])[1],
      params,
      args,
      rngs,
  )
  paths = list(_paths(shapes['deferred']))

  kinds = {path: _layer_kind(_get(params, path)) for path in paths}

  def split(p):
    """(deferred weights by path, the params without them)."""
    weights = {}
    for path, kind in kinds.items():
      layer = dict(_get(p, path))
      weights[path] = layer.pop(_DEFERRED_WEIGHT[kind])
      p = _with(p, path, layer)
    return weights, p

  def join(weights, rest):
    for path, kind in kinds.items():
      rest = _with(rest, path, {**_get(rest, path), _DEFERRED_WEIGHT[kind]: weights[path]})
    return rest

  @jax.custom_vjp
  def run(params, args, rngs):
    return plain.apply({'params': params}, *args, rngs=rngs)

  def forward(params, args, rngs):
    weights, rest = split(params)
    probes = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['probes'])

    def differentiated(rest, probes, args):
      out, recorded = deferring.apply(
          {'params': join(weights, rest), 'probes': probes},
          *args,
          rngs=rngs,
          mutable=['deferred'],
      )
      return out, recorded['deferred']

    out, pullback, recorded = jax.vjp(differentiated, rest, probes, args, has_aux=True)
    return out, (pullback, recorded, params)

  def backward(residuals, d_out):
    pullback, recorded, params = residuals
    d_rest, d_probes, d_args = pullback(d_out)
    d_params = d_rest
    for path, kind in kinds.items():
      layer = _get(params, path)
      d_w = _weight_gradient(kind, _get(recorded, path)['x'], _get(d_probes, path)['y'])
      # The effective weight is a differentiable function of the layer's
      # params (float32 here: the compute dtype's cast is the identity's
      # gradient).
      inputs = {name: layer[name] for name in _WEIGHT_INPUTS[kind]}
      _, to_params = jax.vjp(lambda p: kind.effective_weight(p, jnp.float32), inputs)
      (d_layer,) = to_params(d_w)
      merged = dict(_get(d_params, path))
      for name, g in d_layer.items():
        merged[name] = merged[name] + g if name in merged else g.astype(layer[name].dtype)
      d_params = _with(d_params, path, merged)
    return d_params, d_args, None

  run.defvjp(forward, backward)
  return run(params, args, rngs)
