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

from flax import traverse_util
import jax
import jax.numpy as jnp

from ctm_jax.models import layers
from ctm_jax.models import nlm

# Per layer kind: the parameter taken out of autodiff, and the parameters its
# `effective_weight` reads (which the deferred contraction's gradient reaches).
_DEFERRED_WEIGHT = {layers.Linear: 'kernel', nlm.SuperLinear: 'w1'}
_WEIGHT_INPUTS = {layers.Linear: ('kernel',), nlm.SuperLinear: ('w1', 'temperature')}


def _layer_kind(flat_params, layer):
  """The deferring layer class at path `layer` of flattened params."""
  return nlm.SuperLinear if layer + ('w1',) in flat_params else layers.Linear


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
  flat_params = traverse_util.flatten_dict(params)
  # Layer path -> its class; each recorded ('x') and probed ('y') under it.
  kinds = {
      path[:-1]: _layer_kind(flat_params, path[:-1])
      for path in traverse_util.flatten_dict(shapes['deferred'])
  }
  weight_paths = [layer + (_DEFERRED_WEIGHT[kind],) for layer, kind in kinds.items()]

  @jax.custom_vjp
  def run(params, args, rngs):
    return plain.apply({'params': params}, *args, rngs=rngs)

  def forward(params, args, rngs):
    flat = traverse_util.flatten_dict(params)
    weights = {path: flat.pop(path) for path in weight_paths}
    probes = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['probes'])

    def differentiated(rest, probes, args):
      out, recorded = deferring.apply(
          {'params': traverse_util.unflatten_dict({**rest, **weights}), 'probes': probes},
          *args,
          rngs=rngs,
          mutable=['deferred'],
      )
      return out, recorded['deferred']

    out, pullback, recorded = jax.vjp(differentiated, flat, probes, args, has_aux=True)
    return out, (pullback, recorded, params)

  def backward(residuals, d_out):
    pullback, recorded, params = residuals
    d_flat, d_probes, d_args = pullback(d_out)
    flat = traverse_util.flatten_dict(params)
    recorded = traverse_util.flatten_dict(recorded)
    d_probes = traverse_util.flatten_dict(d_probes)
    for layer, kind in kinds.items():
      d_w = _weight_gradient(kind, recorded[layer + ('x',)], d_probes[layer + ('y',)])
      # The effective weight is a differentiable function of the layer's
      # params (float32 here: the compute dtype's cast is the identity's
      # gradient).
      inputs = {name: flat[layer + (name,)] for name in _WEIGHT_INPUTS[kind]}
      _, to_params = jax.vjp(lambda p: kind.effective_weight(p, jnp.float32), inputs)
      (d_inputs,) = to_params(d_w)
      for name, g in d_inputs.items():
        path = layer + (name,)
        g = g.astype(flat[path].dtype)
        d_flat[path] = d_flat[path] + g if path in d_flat else g
    return traverse_util.unflatten_dict(d_flat), d_args, None

  run.defvjp(forward, backward)
  return run(params, args, rngs)
