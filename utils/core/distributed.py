"""Process-group helpers. One code path for one process and many: every collective is a no-op
when no process group is initialised."""
import glob
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.core import rendezvous
from utils.core.environment import DIST_TIMEOUT_S, env_int
from utils.core.errors import UserError, cause


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

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


def resolve_device(requested, local_rank=0):
    """'cuda' / 'cpu' / 'cuda:N' or None (cuda if available). Under a launcher, cuda means cuda:LOCAL_RANK.
    A GPU that the system shows but torch cannot use is an error, never a silent run on the CPU."""
    if requested is None:
        if not torch.cuda.is_available() and gpu_visible_to_system():
            raise UserError(unusable_gpu_message(' (a full run there takes hours)'))
        requested = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested} is not a device: use cuda, cuda:N or cpu") from None
    if device.type not in ('cuda', 'cpu'):
        raise UserError(f"--device {requested} is not supported: use cuda, cuda:N or cpu")
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            if gpu_visible_to_system():
                raise UserError(f"--device {requested}: " + unusable_gpu_message(''))
            raise UserError(f"--device {requested} asked for, but no CUDA device is visible: use --device cpu")
        if device.index is None:
            device = torch.device('cuda', local_rank)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"{device} asked for, but {torch.cuda.device_count()} CUDA device(s) are visible: "
                            "use fewer processes per node or check CUDA_VISIBLE_DEVICES")
        torch.cuda.set_device(device)
    return device


def init_distributed(device=None, local_rank=None, timeout_s=DIST_TIMEOUT_S):
    """Start the process group if a launcher set WORLD_SIZE > 1 (torchrun, torch.distributed.launch).

    LOCAL_RANK from the environment wins over ``--local_rank``/``--local-rank``. NCCL on GPUs, gloo on
    the CPU (NCCL cannot put two processes on one GPU).
    """
    env_world = env_int('WORLD_SIZE', 1)
    local_rank = env_int('LOCAL_RANK', local_rank if local_rank is not None else 0)
    dev = resolve_device(device, local_rank)
    if env_world > 1 and not is_initialized():
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        try:
            rendezvous.init_process_group(backend, timeout_s)
        except UserError:
            raise
        except Exception as e:  # no rendezvous address, port taken, peers unreachable, no backend
            where = ', '.join(f"{k}={os.environ.get(k, '(unset)')}" for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'))
            raise UserError(f"could not form the {backend} process group ({where}): {cause(e)}. "
                            "Start every process with torchrun --nproc_per_node N "
                            "(or python -m torch.distributed.launch), and pick a free --master_port") from None
    return DistInfo(rank(), world_size(), local_rank, dev)


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
    if is_initialized():
        dist.barrier()


def cleanup():
    if is_initialized():
        dist.destroy_process_group()
