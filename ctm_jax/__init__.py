"""ctm-jax: the Continuous Thought Machine (arXiv 2505.05522) in JAX/Flax."""

__version__ = '0.2.0'

from ctm_jax.models.ctm import CTMOutput
from ctm_jax.models.ctm import ContinuousThoughtMachine
from ctm_jax.models.ctm import project_decay_params

__all__ = [
    '__version__', 'CTMOutput', 'ContinuousThoughtMachine', 'from_pretrained', 'project_decay_params'
]


def from_pretrained(name_or_path: str, task: str | None = None):
  """(model, variables, config) of `hf://ORG/NAME[@REVISION]` (the reference's
  Hub models, e.g. hf://SakanaAI/ctm-imagenet), a folder of config.json +
  model.safetensors, or any workdir ctm_jax.inference.load takes."""
  from ctm_jax import inference  # pylint: disable=g-import-not-at-top  # keeps `import ctm_jax` light

  return inference.from_pretrained(name_or_path, task)
