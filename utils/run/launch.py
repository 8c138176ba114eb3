"""The whole launch of a run as one shell line, so that pasting it back reproduces the run: the launcher
(torchrun, python -m torch.distributed.launch, or the variables set by hand), its processes per node and
nodes, then the entry script and its flags. The process count is part of what a run draws (each process
takes its shard of the training images, SPEC §1b), so a command without it would draw other images.
Imports nothing of torch."""
import shlex

RANK_FLAGS = ('--local-rank', '--local_rank')


def _without_rank_flag(argv):
    """``argv`` less the ``--local-rank=N`` / ``--local_rank N`` that torch.distributed.launch adds."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in RANK_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + '=' for f in RANK_FLAGS)):
            out.append(a)
    return out


def launch_command(script, argv, env):
    """The shell-quoted command of this process's run, launcher included. ``env``: the process's
    environment (WORLD_SIZE, LOCAL_WORLD_SIZE, ... as the launcher set them)."""
    world = int(env.get('WORLD_SIZE', '1') or 1)
    run = [script, *_without_rank_flag(argv)]
    if world <= 1:
        return shlex.join(['python', *run])
    per_node = int(env.get('LOCAL_WORLD_SIZE') or world)
    nodes = max(1, world // per_node)
    if 'TORCHELASTIC_RUN_ID' not in env:  # the variables set by hand, one process each
        names = ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')
        return shlex.join([f'{k}={env[k]}' for k in names if k in env] + ['python', *run])
    launcher = (['python', '-m', 'torch.distributed.launch'] if len(argv) != len(run) - 1 else ['torchrun'])
    launcher += ['--nproc_per_node', str(per_node)]
    if nodes > 1:
        launcher += ['--nnodes', str(nodes), '--node_rank', str(int(env.get('GROUP_RANK', 0))),
                     '--master_addr', env.get('MASTER_ADDR', '')]
    if env.get('MASTER_PORT'):
        launcher += ['--master_port', env['MASTER_PORT']]
    return shlex.join([*launcher, *run])
