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

# The layer classes that defer (`defer=True`); each names its deferred weight,
# the parameters its `effective_weight` reads and its `weight_gradient`.
_KINDS = (layers.Linear, nlm.SuperLinear)


def _layer_kind(flat_params, layer):
  """The deferring layer class at path `layer` of flattened params."""
  (kind,) = [k for k in _KINDS if layer + (k.DEFERRED_WEIGHT,) in flat_params]
  return kind


def scan(plain, deferring, params, args, rngs, history_of=None):
  """`plain.apply({'params': params}, *args, rngs=rngs)` (a scanned tick module,
  unbound), whose parameter gradients come from `deferring` (the same module
  with `defer=True`) as described above.

  Returns the scan's (final state, per-tick outputs). `args` are the scan's
  positional inputs (state, per-tick inputs, fixed inputs, synch params);
  `rngs` its rng dict (may be empty). `history_of(args)`: the sliding history
  (D, M, B) before the first tick, for layers that record only its newest
  entry (the NLMs' first layer: its windows are rebuilt here, not stacked per
  tick).
  """
  shapes = jax.eval_shape(
      lambda p, a, r: deferring.apply({'params': p}, *a, rngs=r, mutable=['probes', 'deferred'])[1],
      params,
      args,
      rngs,
  )
  flat_params = traverse_util.flatten_dict(params)
  # Layer path -> its class; each recorded ('x', or 'x_newest' of a window) and
  # probed ('y') under it.
  kinds = {
      path[:-1]: _layer_kind(flat_params, path[:-1])
      for path in traverse_util.flatten_dict(shapes['deferred'])
  }
  weight_paths = [layer + (kind.DEFERRED_WEIGHT,) for layer, kind in kinds.items()]

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
    history = history_of(args) if history_of else None
    return out, (pullback, recorded, params, history)

  def backward(residuals, d_out):
    pullback, recorded, params, history_DxMxB = residuals
    d_flat, d_probes, d_args = pullback(d_out)
    flat = traverse_util.flatten_dict(params)
    recorded = traverse_util.flatten_dict(recorded)
    d_probes = traverse_util.flatten_dict(d_probes)
    for layer, kind in kinds.items():
      dy = d_probes[layer + ('y',)]
      if layer + ('x_newest',) in recorded:
        d_w = kind.window_weight_gradient(history_DxMxB, recorded[layer + ('x_newest',)], dy)
      else:
        d_w = kind.weight_gradient(recorded[layer + ('x',)], dy)
      # The effective weight is a differentiable function of the layer's
      # params (float32 here: the compute dtype's cast is the identity's
      # gradient).
      inputs = {name: flat[layer + (name,)] for name in kind.WEIGHT_PARAMS}
      _, to_params = jax.vjp(lambda p: kind.effective_weight(p, jnp.float32), inputs)
      (d_inputs,) = to_params(d_w)
      for name, g in d_inputs.items():
        path = layer + (name,)
        g = g.astype(flat[path].dtype)
        d_flat[path] = d_flat[path] + g if path in d_flat else g
    return traverse_util.unflatten_dict(d_flat), d_args, None

  run.defvjp(forward, backward)
  return run(params, args, rngs)
