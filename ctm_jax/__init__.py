"""ctm-jax: the Continuous Thought Machine (arXiv 2505.05522) in JAX/Flax."""

__version__ = '0.2.0'

from ctm_jax.models.ctm import CTMOutput
from ctm_jax.models.ctm import ContinuousThoughtMachine
from ctm_jax.models.ctm import project_decay_params

__all__ = ['__version__', 'CTMOutput', 'ContinuousThoughtMachine', 'project_decay_params']
