"""Process-group helpers. One code path for one process and many: every collective is a no-op
when no process group is initialised."""
import glob
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.core import rendezvous
from utils.core.environment import DIST_TIMEOUT_S, cpus_available, cpus_per_process, env_int, local_processes
from utils.core.errors import UserError, cause


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')
    note: str = ''  # why the run is on the CPU although the system shows a GPU (GPUs hidden on purpose)

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if is_initialized() else 1


def rank():
    return dist.get_rank() if is_initialized() else 0


def gpu_visible_to_system():
    """Whether the OS shows an NVIDIA GPU (its driver's device files), whatever torch can use."""
    return bool(glob.glob('/proc/driver/nvidia/gpus/*') or glob.glob('/dev/nvidia[0-9]*'))


def unusable_gpu_message(flag):
    """The one-line error for a GPU the system shows but this torch cannot use."""
    build = ('a CPU-only build' if torch.version.cuda is None else
             f'built for CUDA {torch.version.cuda}, which may need a newer NVIDIA driver than this one')
    return (f"an NVIDIA GPU is visible to the system, but torch {torch.__version__} cannot use it ({build}): "
            "install the torch build for your driver (README, Install), or pass --device cpu to run on the CPU "
            f"anyway{flag}")


def gpus_hidden(environ=os.environ):
    """Why GPUs that the system shows are hidden from this process on purpose, or None: an empty (or -1,
    or SLURM's NoDevFiles) CUDA_VISIBLE_DEVICES, or a SLURM job that was given no GPU. Such a process runs
    on the CPU; a GPU hidden by nothing of the kind means a broken install."""
    visible = environ.get('CUDA_VISIBLE_DEVICES')
    if visible is not None and visible.strip() in ('', '-1', 'NoDevFiles'):
        return f'CUDA_VISIBLE_DEVICES={visible!r} hides every GPU'
    if (visible is None and environ.get('SLURM_JOB_ID')
            and not any(environ.get(k) for k in ('SLURM_JOB_GPUS', 'SLURM_STEP_GPUS', 'SLURM_GPUS_ON_NODE'))):
        return f"SLURM job {environ['SLURM_JOB_ID']} was given no GPU (ask with --gres=gpu:N or --gpus N)"
    return None


def resolve_device(requested, local_rank=0):
    """(device, note) for 'cuda' / 'cpu' / 'cuda:N' or None (cuda if available). Under a launcher, cuda
    means cuda:LOCAL_RANK. A GPU that the system shows but torch cannot use is an error, never a silent run
    on the CPU, unless it is hidden on purpose (``gpus_hidden``): then the CPU, and ``note`` says why."""
    note = ''
    if requested is None:
        if not torch.cuda.is_available() and gpu_visible_to_system():
            hidden = gpus_hidden()
            if hidden is None:
                raise UserError(unusable_gpu_message(' (a full run there takes hours)'))
            note = f'{hidden}: running on the CPU (a full run there takes hours)'
        requested = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested} is not a device: use cuda, cuda:N or cpu") from None
    if device.type not in ('cuda', 'cpu'):
        raise UserError(f"--device {requested} is not supported: use cuda, cuda:N or cpu")
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            hidden = gpu_visible_to_system() and gpus_hidden()
            if hidden:
                raise UserError(f"--device {requested} asked for, but {hidden}: unset it (or name the GPUs), "
                                "or pass --device cpu")
            if gpu_visible_to_system():
                raise UserError(f"--device {requested}: " + unusable_gpu_message(''))
            raise UserError(f"--device {requested} asked for, but no CUDA device is visible: use --device cpu")
        if device.index is None:
            device = torch.device('cuda', local_rank)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"{device} asked for, but {torch.cuda.device_count()} CUDA device(s) are visible: "
                            "use fewer processes per node or check CUDA_VISIBLE_DEVICES")
        torch.cuda.set_device(device)
    return device, note


def init_distributed(device=None, local_rank=None, timeout_s=DIST_TIMEOUT_S):
    """Start the process group if a launcher set WORLD_SIZE > 1 (torchrun, torch.distributed.launch).

    LOCAL_RANK from the environment wins over ``--local_rank``/``--local-rank``. NCCL on GPUs, gloo on
    the CPU (NCCL cannot put two processes on one GPU).
    """
    env_world = env_int('WORLD_SIZE', 1)
    local_rank = env_int('LOCAL_RANK', local_rank if local_rank is not None else 0)
    if env_world > 1 and device is not None and device.startswith('cuda:'):
        raise UserError(f"--device {device} under a launcher (WORLD_SIZE={env_world}) puts every process on GPU "
                        f"{device[5:]} (NCCL: duplicate GPU): pass --device cuda, and each process takes "
                        "cuda:LOCAL_RANK (choose the GPUs with CUDA_VISIBLE_DEVICES)")
    dev, note = resolve_device(device, local_rank)
    if env_world > 1 and not is_initialized():
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        try:
            # device_id binds NCCL's communicator to this rank's GPU at once (and barrier() needs no guess)
            rendezvous.init_process_group(backend, timeout_s, device_id=dev if dev.type == 'cuda' else None)
        except UserError:
            raise
        except Exception as e:  # no rendezvous address, port taken, peers unreachable, no backend
            where = ', '.join(f"{k}={os.environ.get(k, '(unset)')}" for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'))
            raise UserError(f"could not form the {backend} process group ({where}): {cause(e)}. "
                            "Start every process with torchrun --nproc_per_node N "
                            "(or python -m torch.distributed.launch), and pick a free --master_port") from None
    return DistInfo(rank(), world_size(), local_rank, dev, note)


def limit_cpu_threads():
    """Cap torch's CPU threads at this process's share of the CPUs it may use (its affinity mask or
    SLURM_CPUS_PER_TASK, split over the run's processes on this node), never raising them, so that N
    processes on one node do not each run a thread per core. An OMP_NUM_THREADS already set wins (torchrun
    sets 1 for several processes). Returns (threads, CPUs available, processes on this node)."""
    if 'OMP_NUM_THREADS' not in os.environ and torch.get_num_threads() > cpus_per_process():
        torch.set_num_threads(cpus_per_process())
    return torch.get_num_threads(), cpus_available(), local_processes()


def all_reduce_sum(*tensors):
    """Sum each tensor over all processes, in place."""
    if is_initialized():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return tensors


def broadcast(tensor, src=0):
    if is_initialized():
        dist.broadcast(tensor, src)
    return tensor


def broadcast_object(obj, src=0):
    """``src``'s picklable ``obj`` on every process."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def agree(value, src=0):
    """``src``'s ``value`` on every process. Every decision that steers control flow or picks a result
    (a failed solve, an r², a fallback) is taken once, by rank 0, and sent to the others: processes whose
    floating-point results differ (another cuDNN algorithm under ``cudnn.benchmark``, another GPU) then
    never take different branches, which would leave collectives unmatched (an NCCL hang) or evaluate
    different models."""
    return broadcast_object(value, src)


def agree_tensors(*tensors, src=0):
    """``src``'s tensors on every process, in place (same shapes and dtypes everywhere); returns them."""
    if is_initialized():
        for t in tensors:
            dist.broadcast(t, src)
    return tensors


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every process ([obj] alone)."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_cat(tensor):
    """Concatenate equally shaped tensors of all processes along dim 0, rank order."""
    if not is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def barrier():
    """A barrier; under NCCL on this rank's GPU (without device_ids torch warns on every run that it
    guesses the device)."""
    if is_initialized():
        if dist.get_backend() == 'nccl':
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup():
    if is_initialized():
        dist.destroy_process_group()
