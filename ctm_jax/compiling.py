"""XLA options every program that runs a model is compiled with: the train and
eval steps, evaluation, prediction and serving.

XLA:CPU hands dots, reductions and convolutions to YNNPACK by default; its
convolutions are slower here than XLA's own (Eigen) ones: a ResNet
backbone's train step up to 10% faster without them, a model's eval forward
3-9% (docs/performance.md).
"""

import functools
import os

import jax
import numpy as np

YNN_FUSION_OPTION = 'xla_cpu_experimental_ynn_fusion_type'
YNN_FUSIONS_WITHOUT_CONVOLUTIONS = 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'


@functools.cache
def compiler_options() -> dict:
  """On CPU, convolutions off YNNPACK. Empty elsewhere, when XLA_FLAGS
  already sets the choice, or when this jaxlib does not know the option."""
  if jax.default_backend() != 'cpu' or YNN_FUSION_OPTION in os.environ.get('XLA_FLAGS', ''):
    return {}
  options = {YNN_FUSION_OPTION: YNN_FUSIONS_WITHOUT_CONVOLUTIONS}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
  except jax.errors.JaxRuntimeError:  # A jaxlib without this option: keep its default.
    return {}
  return options


def jit(fn, **kwargs):
  """`jax.jit(fn, **kwargs)` with `compiler_options()`; call it at run time
  (the options ask the backend which platform it is)."""
  return jax.jit(fn, compiler_options=compiler_options(), **kwargs)
