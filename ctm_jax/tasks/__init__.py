"""Tasks: everything the trainer, checkpoints, evaluation, import and the
benchmarks know about a problem, behind one interface (`base.Task`).

A task is a module in this package that subclasses `Task` and registers it
with `@register`; the registry imports every module here on first lookup, so
adding a task is adding its file. Code outside `ctm_jax/tasks/`, `ctm_jax/data/`
and `configs/` asks the task and never names one.
"""

from ctm_jax.tasks.base import Task
from ctm_jax.tasks.base import get
from ctm_jax.tasks.base import names
from ctm_jax.tasks.base import register

__all__ = ['Task', 'get', 'names', 'register']
