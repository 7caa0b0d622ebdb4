"""Run configs shipped with the package: ``load_config("tiny")`` finds ``sessa_jax/configs/tiny.py``.

Each module defines ``get_config()`` returning a ``ml_collections.ConfigDict`` built from
``sessa_jax.train.config.base_config()``. The top-level ``configs/`` of a source checkout
is a link to this directory.
"""
