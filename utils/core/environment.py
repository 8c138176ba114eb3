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


def cpus_available():
    """CPUs this process may run on: its affinity mask (taskset, a SLURM or container CPU set), at most
    SLURM_CPUS_PER_TASK; never os.cpu_count(), which counts the whole node."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    per_task = env_int('SLURM_CPUS_PER_TASK', None)
    return max(1, min(n, per_task) if per_task else n)


def local_processes():
    """Processes of this run on this node that share ``cpus_available()``: torchrun's LOCAL_WORLD_SIZE;
    else, for SLURM tasks without a CPU count of their own, SLURM_NTASKS_PER_NODE; else 1."""
    local = env_int('LOCAL_WORLD_SIZE', None)
    if local is None and not os.environ.get('SLURM_CPUS_PER_TASK'):
        local = env_int('SLURM_NTASKS_PER_NODE', None)
    return max(1, local or 1)


def cpus_per_process():
    """This process's share of the node's CPUs (at least 1): threads and val-loader workers follow it, so
    that N processes on one node do not each start a thread per core."""
    return max(1, cpus_available() // local_processes())


# c10d's C++ log lines (a client's connection retries, with their C++ stack) say again, in torch's words, what
# the project's own waiting line and error line say: hidden unless the user set a level.
CPP_LOG_LEVEL = ('TORCH_CPP_LOG_LEVEL', 'FATAL')


def quiet_cpp_logs(environ=None):
    """Set TORCH_CPP_LOG_LEVEL for a process of a multi-process run (WORLD_SIZE > 1), unless set; it is read
    when torch loads, so call this before torch is imported. Returns True where it set it."""
    environ = os.environ if environ is None else environ
    name, level = CPP_LOG_LEVEL
    world = environ.get('WORLD_SIZE', '1')
    if name in environ or not world.isdigit() or int(world) <= 1:  # a malformed WORLD_SIZE: the flag check says so
        return False
    environ[name] = level
    return True
