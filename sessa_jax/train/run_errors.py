"""The errors ``train.py`` reports as one clean message (no traceback) after start-up.

Each is raised for a problem of the user's data, devices, workdir or checkpoints, with a
message that names the value and the fix. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from sessa_jax.sharding import MeshError
from sessa_jax.train.checkpoint import CheckpointError
from sessa_jax.train.config import ConfigError
from sessa_jax.train.loop import NonFiniteError
from sessa_jax.train.resume_guard import ResumeError
from sessa_jax.train.workdir import WorkdirError

# ValueError: data errors (an eval split smaller than a batch, shard seq_len mismatch);
# FileNotFoundError/PermissionError: missing corpus or ArrayRecord directory, unreadable files.
USER_ERRORS = (ConfigError, MeshError, ResumeError, CheckpointError, WorkdirError, NonFiniteError,
               FileNotFoundError, PermissionError, ValueError)
