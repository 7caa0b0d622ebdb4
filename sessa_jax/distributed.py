"""Multi-process start-up: ``jax.distributed.initialize`` when the config or the cluster asks.

Call ``maybe_initialize`` before anything touches a JAX backend (``train.py`` does). On a
Cloud TPU pod slice, under SLURM and with Open MPI JAX finds the coordinator by itself;
elsewhere give ``distributed.coordinator_address`` (or ``JAX_COORDINATOR_ADDRESS``),
``num_processes`` and ``process_id`` (or ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``).
"""

from __future__ import annotations

import os

import jax


def detected_cluster(environ=os.environ) -> str | None:
    """Name of the multi-process environment we run in, or None for a single process."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "," in environ.get("TPU_WORKER_HOSTNAMES", "") or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "Cloud TPU"
    if int(environ.get("SLURM_NTASKS", environ.get("SLURM_NPROCS", "1")) or 1) > 1:
        return "SLURM"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    return None


def maybe_initialize(dist_cfg, log=print, environ=os.environ) -> bool:
    """Starts the JAX distributed runtime if asked; returns whether it is running.

    ``dist_cfg.initialize``: "no" never, "yes" always, "auto" when an address is given or
    a cluster is detected. On CPU it selects gloo so processes can run collectives.
    """
    if jax.distributed.is_initialized():
        return True
    address = dist_cfg.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS", "")
    cluster = detected_cluster(environ)
    if dist_cfg.initialize == "no" or (dist_cfg.initialize == "auto" and not (address or cluster)):
        return False
    kw = {}
    if address:
        kw = dict(
            coordinator_address=address,
            num_processes=dist_cfg.num_processes or int(environ.get("JAX_NUM_PROCESSES", "0")) or None,
            process_id=dist_cfg.process_id
            if dist_cfg.process_id >= 0
            else int(environ.get("JAX_PROCESS_ID", "-1"))
            if environ.get("JAX_PROCESS_ID")
            else None,
        )
    if jax.config.jax_platforms in ("cpu",) or environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kw)
    if jax.process_index() == 0:
        log(
            f"distributed: {jax.process_count()} processes ({cluster or 'explicit coordinator'}), "
            f"{jax.device_count()} devices"
        )
    return True
