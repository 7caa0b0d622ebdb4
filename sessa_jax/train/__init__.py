"""Training: run configs, optimizer, state, jitted steps, loop, orbax checkpoints, metrics."""

from sessa_jax.train.config import ConfigError, base_config, load_config, model_config, validate

__all__ = ["ConfigError", "base_config", "load_config", "model_config", "train", "validate"]


def train(cfg, workdir: str, log=print):
    """Trains ``cfg`` in ``workdir`` (see ``sessa_jax.train.loop.train``)."""
    # Imported here: the loop imports the model, orbax and the data pipeline, which checking a
    # config (this package's other names) never needs.
    from sessa_jax.train.loop import train as _train

    return _train(cfg, workdir, log)
