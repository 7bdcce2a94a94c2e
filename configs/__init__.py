"""Experiment configs: `get_config(arg)` files for ml_collections' config flags.

Installed as the package `ctm_jax.configs` (setup.py), so config files import
their bases by name from any working directory.
"""

# What `python -m ctm_jax.main` trains when no --config is given: a run that
# learns on a laptop CPU with no download.
DEFAULT = 'parity.py:small'

