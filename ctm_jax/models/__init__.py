"""CTM models."""

from ctm_jax.models.ctm import CTMOutput
from ctm_jax.models.ctm import ContinuousThoughtMachine
from ctm_jax.models.ctm import Tracking
from ctm_jax.models.ctm import project_decay_params
