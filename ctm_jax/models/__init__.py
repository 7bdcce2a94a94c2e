"""CTM models.

`ctm.ContinuousThoughtMachine` is the reference's main model. A model variant
(a task whose inputs arrive over the ticks, a model without attention, a
baseline) is one file here: a subclass that overrides `check_input` and
`tick_inputs` (what the tick reads: `ctm.TickInputs`, per tick (scanned) or
fixed (broadcast)), so that the shared `__call__` (early exit and serving
included) runs it; or whose `__call__` composes the shared pieces
(`featurise`, `project_kv`, `synch_params`, `initial_state`, `run_ticks`,
`outputs`) itself. `sort.py` is the first kind. A task picks it with
`Task.model_class`.
"""

from ctm_jax.models.ctm import CTMOutput
from ctm_jax.models.ctm import ContinuousThoughtMachine
from ctm_jax.models.ctm import TickInputs
from ctm_jax.models.ctm import Tracking
from ctm_jax.models.ctm import project_decay_params

__all__ = [
    'CTMOutput',
    'ContinuousThoughtMachine',
    'TickInputs',
    'Tracking',
    'project_decay_params',
]
