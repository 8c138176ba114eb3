"""Launcher variables (torchrun, torch.distributed.launch), read without importing torch."""
import os

from utils.core.errors import UserError


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
