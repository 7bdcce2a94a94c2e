"""Data: deterministic sources per task family and the shared grain pipeline."""

from ctm_jax.data.parity import ParitySource
from ctm_jax.data.parity import eval_source as parity_eval_source
from ctm_jax.data.parity import train_source as parity_train_source
from ctm_jax.data.pipeline import DATA_ITEM
from ctm_jax.data.pipeline import item_handlers
from ctm_jax.data.pipeline import make_eval_batches
from ctm_jax.data.pipeline import make_train_loader
from ctm_jax.data.pipeline import restore_args
from ctm_jax.data.pipeline import save_args

__all__ = [
    'DATA_ITEM',
    'ParitySource',
    'item_handlers',
    'make_eval_batches',
    'make_train_loader',
    'parity_eval_source',
    'parity_train_source',
    'restore_args',
    'save_args',
]
