"""Launcher variables (torchrun, torch.distributed.launch), read without importing torch."""
import os

from utils.core.errors import UserError

# How long the processes of a run wait for each other to form the process group (--dist_timeout): every
# process of a job starts within seconds of the others, so 10 min is ample; torch's own is 30 min, in silence.
DIST_TIMEOUT_S = 600


def env_int(name, default):
    """An integer launcher variable (WORLD_SIZE, LOCAL_RANK, ...), or an error naming it."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer: unset it, or start the run "
                        "with torchrun, which sets it") from None
