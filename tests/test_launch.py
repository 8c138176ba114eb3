"""The log's command line is the whole launch: pasted back, it starts the same number of processes the same
way (the process count decides the images, SPEC §1b)."""
import shlex

import pytest

from utils.run.launch import launch_command

TORCHRUN = {'WORLD_SIZE': '2', 'LOCAL_WORLD_SIZE': '2', 'RANK': '1', 'LOCAL_RANK': '1', 'GROUP_RANK': '0',
            'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': '29511', 'TORCHELASTIC_RUN_ID': 'none'}


def test_one_process_is_plain_python():
    assert launch_command('qwt_swin.py', ['--demo', '--output_dir', 'my dir'], {}) == \
        "python qwt_swin.py --demo --output_dir 'my dir'"


def test_torchrun_names_its_processes_per_node_and_port():
    assert launch_command('qwt_swin.py', ['--demo'], TORCHRUN) == \
        'torchrun --nproc_per_node 2 --master_port 29511 qwt_swin.py --demo'


@pytest.mark.parametrize('argv', [['--local-rank=1', '--demo'], ['--local_rank', '1', '--demo']])
def test_torch_distributed_launch_is_named_and_its_rank_flag_dropped(argv):
    assert launch_command('qwt_vit_and_deit.py', argv, TORCHRUN) == \
        'python -m torch.distributed.launch --nproc_per_node 2 --master_port 29511 qwt_vit_and_deit.py --demo'


def test_several_nodes_name_the_nodes_and_this_nodes_rank():
    env = dict(TORCHRUN, WORLD_SIZE='8', LOCAL_WORLD_SIZE='4', GROUP_RANK='1', MASTER_ADDR='node0')
    assert shlex.split(launch_command('qwt_swin.py', ['--demo'], env)) == [
        'torchrun', '--nproc_per_node', '4', '--nnodes', '2', '--node_rank', '1', '--master_addr', 'node0',
        '--master_port', '29511', 'qwt_swin.py', '--demo']


def test_variables_set_by_hand_are_kept():
    env = {'WORLD_SIZE': '2', 'RANK': '0', 'LOCAL_RANK': '0', 'MASTER_ADDR': '10.0.0.1', 'MASTER_PORT': '1234'}
    assert launch_command('qwt_swin.py', ['--demo'], env) == \
        'WORLD_SIZE=2 RANK=0 LOCAL_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=1234 python qwt_swin.py --demo'
