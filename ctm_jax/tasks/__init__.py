"""Tasks: everything the trainer, checkpoints, evaluation, import and the
benchmarks know about a problem, behind one small interface in parts
(`base.Task` and the parts it opts into: `Supervised`, `Evaluated`,
`Predicts`, `ImportsReference`).

A task is a module in this package that subclasses `Task` and its parts and
registers it with `@register`; the registry imports every module here on
first lookup, so adding a task is adding its file. Code outside
`ctm_jax/tasks/`, `ctm_jax/data/` and `configs/` asks the task and never
names one.
"""

from ctm_jax.tasks.base import Evaluated
from ctm_jax.tasks.base import ImportsReference
from ctm_jax.tasks.base import Predicts
from ctm_jax.tasks.base import Supervised
from ctm_jax.tasks.base import Task
from ctm_jax.tasks.base import check_finite
from ctm_jax.tasks.base import check_input_file
from ctm_jax.tasks.base import get
from ctm_jax.tasks.base import names
from ctm_jax.tasks.base import register
from ctm_jax.tasks.base import with_part

__all__ = [
    'Evaluated', 'ImportsReference', 'Predicts', 'Supervised', 'Task', 'check_finite',
    'check_input_file', 'get', 'names', 'register', 'with_part',
]
