"""Hazards of the GPU path that a CPU run never meets, closed and tested on the CPU (issue 24): a fixed
GPU index under a launcher, GPUs hidden on purpose, NCCL's device binding, CPU oversubscription."""
import pytest
import torch
import torch.distributed as dist

from utils.core import distributed, environment
from utils.core.errors import UserError
from utils.run import cli

LAUNCH_ENV = ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'OMP_NUM_THREADS',
              'CUDA_VISIBLE_DEVICES', 'SLURM_JOB_ID', 'SLURM_JOB_GPUS', 'SLURM_STEP_GPUS', 'SLURM_GPUS_ON_NODE',
              'SLURM_CPUS_PER_TASK', 'SLURM_NTASKS_PER_NODE')


@pytest.fixture
def env(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def two_gpus(env):
    """torch sees two CUDA devices; nothing touches a real one. Returns the process-group calls (backend,
    device_id) that reach torch."""
    calls = []
    env.setattr(torch.cuda, 'is_available', lambda: True)
    env.setattr(torch.cuda, 'device_count', lambda: 2)
    env.setattr(torch.cuda, 'set_device', lambda device: None)
    env.setattr(dist, 'rendezvous', lambda *a, **k: iter([(FakeStore(), 1, 2)]))
    env.setattr(dist, 'init_process_group', lambda *a, **k: calls.append((k['backend'], k.get('device_id'))))
    return calls


class FakeStore:
    def set_timeout(self, timeout):
        pass


def test_a_fixed_gpu_under_a_launcher_is_refused_in_one_line(env, two_gpus):
    env.setenv('WORLD_SIZE', '2')
    env.setenv('LOCAL_RANK', '1')
    with pytest.raises(UserError) as info:
        distributed.init_distributed('cuda:1')
    assert str(info.value) == ('--device cuda:1 under a launcher (WORLD_SIZE=2) puts every process on GPU 1 (NCCL: '
                               'duplicate GPU): pass --device cuda, and each process takes cuda:LOCAL_RANK (choose '
                               'the GPUs with CUDA_VISIBLE_DEVICES)')
    assert two_gpus == []
    env.setenv('WORLD_SIZE', '1')  # one process: cuda:1 is a plain choice
    assert distributed.init_distributed('cuda:1').device == torch.device('cuda', 1)


def test_nccl_is_bound_to_the_rank_gpu(env, two_gpus):
    """init_process_group gets device_id (NCCL binds its communicator at once); a CPU run does not."""
    env.setenv('WORLD_SIZE', '2')
    env.setenv('LOCAL_RANK', '1')
    env.setattr(distributed, 'is_initialized', lambda: False)
    info = distributed.init_distributed('cuda')
    assert info.device == torch.device('cuda', 1)
    assert two_gpus == [('nccl', torch.device('cuda', 1))]
    two_gpus.clear()
    distributed.init_distributed('cpu')
    assert two_gpus == [('gloo', None)]


@pytest.mark.parametrize('backend,expected', [('nccl', {'device_ids': [3]}), ('gloo', {})])
def test_barrier_names_the_gpu_under_nccl(monkeypatch, backend, expected):
    calls = []
    monkeypatch.setattr(distributed, 'is_initialized', lambda: True)
    monkeypatch.setattr(dist, 'get_backend', lambda *a: backend)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 3)
    monkeypatch.setattr(dist, 'barrier', lambda *a, **k: calls.append((a, k)))
    distributed.barrier()
    assert calls == [((), expected)]


@pytest.fixture
def gpu_unusable(env):
    env.setattr(distributed, 'gpu_visible_to_system', lambda: True)
    env.setattr(torch.cuda, 'is_available', lambda: False)
    return env


@pytest.mark.parametrize('variables,why', [
    ({'CUDA_VISIBLE_DEVICES': ''}, "CUDA_VISIBLE_DEVICES='' hides every GPU"),
    ({'CUDA_VISIBLE_DEVICES': '-1'}, "CUDA_VISIBLE_DEVICES='-1' hides every GPU"),
    ({'CUDA_VISIBLE_DEVICES': 'NoDevFiles'}, "CUDA_VISIBLE_DEVICES='NoDevFiles' hides every GPU"),
    ({'SLURM_JOB_ID': '77'}, 'SLURM job 77 was given no GPU (ask with --gres=gpu:N or --gpus N)')])
def test_gpus_hidden_on_purpose_mean_the_cpu(gpu_unusable, variables, why):
    for k, v in variables.items():
        gpu_unusable.setenv(k, v)
    assert distributed.resolve_device(None) == (torch.device('cpu'), f'{why}: running on the CPU (a full run there '
                                                                     'takes hours)')
    with pytest.raises(UserError) as info:
        distributed.resolve_device('cuda')
    assert str(info.value) == f'--device cuda asked for, but {why}: unset it (or name the GPUs), or pass --device cpu'


@pytest.mark.parametrize('variables', [{}, {'CUDA_VISIBLE_DEVICES': '0'}, {'SLURM_JOB_ID': '77', 'SLURM_JOB_GPUS': '0'},
                                       {'SLURM_JOB_ID': '77', 'SLURM_GPUS_ON_NODE': '1'}])
def test_a_gpu_not_hidden_is_still_a_broken_install(gpu_unusable, variables):
    for k, v in variables.items():
        gpu_unusable.setenv(k, v)
    with pytest.raises(UserError, match='^an NVIDIA GPU is visible to the system, but torch'):
        distributed.resolve_device(None)


@pytest.fixture
def sixteen_cpus(env):
    env.setattr(environment.os, 'sched_getaffinity', lambda pid: set(range(16)))
    return env


@pytest.mark.parametrize('variables,cpus,local,share', [
    ({}, 16, 1, 16),
    ({'LOCAL_WORLD_SIZE': '4'}, 16, 4, 4),                              # torchrun, 4 processes
    ({'SLURM_CPUS_PER_TASK': '6'}, 6, 1, 6),                           # one SLURM task of 6 CPUs
    ({'SLURM_CPUS_PER_TASK': '6', 'LOCAL_WORLD_SIZE': '4'}, 6, 4, 1),  # torchrun inside that task
    ({'SLURM_NTASKS_PER_NODE': '3'}, 16, 3, 5),                        # 3 tasks sharing the node's CPUs
    ({'LOCAL_WORLD_SIZE': '32'}, 16, 32, 1)])
def test_cpus_follow_affinity_and_slurm_split_over_local_processes(sixteen_cpus, variables, cpus, local, share):
    for k, v in variables.items():
        sixteen_cpus.setenv(k, v)
    assert (environment.cpus_available(), environment.local_processes(), environment.cpus_per_process()) == (
        cpus, local, share)


def test_threads_and_val_workers_take_the_process_share(sixteen_cpus):
    sixteen_cpus.setenv('LOCAL_WORLD_SIZE', '8')
    args = cli.parse_args('vit', ['--model', 'deit_tiny', '--data_dir', '.'])
    assert args.eval_workers == 2  # 16 CPUs / 8 processes; os.cpu_count() would give 8
    assert cli.parse_args('vit', ['--model', 'deit_tiny', '--data_dir', '.', '--eval_workers', '5']).eval_workers == 5
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert distributed.limit_cpu_threads() == (2, 16, 8) and torch.get_num_threads() == 2
        torch.set_num_threads(1)  # never raised
        assert distributed.limit_cpu_threads()[0] == 1
        torch.set_num_threads(4)
        sixteen_cpus.setenv('OMP_NUM_THREADS', '4')  # the user's (or torchrun's) choice wins
        assert distributed.limit_cpu_threads()[0] == 4
    finally:
        torch.set_num_threads(before)


def test_val_workers_stop_at_eight(sixteen_cpus):
    """One process with 16 CPUs: the val loader takes 8 workers (EVAL_WORKERS), not 16."""
    assert cli.parse_args('vit', ['--model', 'deit_tiny', '--data_dir', '.']).eval_workers == 8


@pytest.mark.parametrize('stage,exc,expected', [
    ('qwt_data', torch.cuda.OutOfMemoryError('x'), 'out of GPU memory in stage qwt: QwT holds'),
    ('save', MemoryError(), 'out of memory (RAM) in stage qwt: QwT holds'),
    ('calibration_data', RuntimeError("can't allocate memory"), 'out of memory (RAM) in stage ptq: the post-training quantizer'),
    ('data', RuntimeError('cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE'), 'out of GPU memory in stage ptq: '),
    ('build', RuntimeError('CUDA error: out of memory'), 'out of GPU memory in stage build: the full-precision'),
    (None, RuntimeError('CUSOLVER_STATUS_ALLOC_FAILED'), 'out of GPU memory: use a device with more memory, or fewer '
                                                        'processes per node (CUSOLVER_STATUS_ALLOC_FAILED)')])
def test_every_stage_maps_to_its_advice(stage, exc, expected):
    """The stages without advice of their own take their neighbour's (QwT images and --save: QwT; the
    calibration batch and the data: the post-training quantizer); an error that left no stage gets the general line."""
    from utils.run import memory
    if stage is not None:
        exc.qwt_stage = stage
    assert memory.is_out_of_memory(exc)
    assert memory.describe(exc, str(exc)).startswith(expected)


def test_other_errors_are_not_out_of_memory():
    from utils.run import memory
    assert not memory.is_out_of_memory(RuntimeError('shape mismatch'))
    assert not memory.on_gpu(MemoryError()) and memory.on_gpu(RuntimeError('CUBLAS_STATUS_ALLOC_FAILED'))
