"""What the scripts say (issue 29, findings 7-11): a usage error is one line on stderr and nothing else; each
script's --help describes only what it accepts and does; --load refuses a flag that contradicts the saved
model; a flag that changes the computation names the output folder; the README's Flags table names every flag."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from utils.run import cli, demo as demo_mod
from utils.run.loaded import check_load_flags, contradicting_flag
from utils.core.errors import UserError
from utils.core.environment import quiet_cpp_logs

README = open(os.path.join(ROOT, 'README.md')).read()


def _stderr_lines(*argv):
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == '', (proc.stdout, proc.stderr)
    return proc.stderr.splitlines()


@pytest.mark.parametrize('argv,message', [
    (['qwt_resnet.py', '--model', 'resnet18', '--data_dir', '.', '--kernel_size', '2'],
     'error: --kernel_size 2 must be odd and >= 1'),
    (['qwt_resnet.py', '--model', 'resnet18', '--data_dir', '.', '--factor', '0'], 'error: --factor 0 must be >= 1'),
    (['qwt_resnet.py', '--model', 'resnet18', '--data_dir', '.', '--checkpoint', 'missing.pth'],
     'error: --checkpoint missing.pth not found: pass the path of a local .pth or .pth.tar file'),
    (['qwt_swin.py', '--factor', '3'], 'error: unrecognized arguments: --factor 3 (python qwt_swin.py --help lists'),
    (['qwt_vit_and_deit.py', '--w_bits'], 'error: argument --w_bit/--w_bits: expected one argument (python'),
    (['tools/make_table.py'], 'error: the following arguments are required: results'),
])
def test_a_usage_error_is_one_line_and_nothing_else(argv, message):
    lines = _stderr_lines(*argv)
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert 'usage:' not in lines[0]


def test_help_of_the_resnet_script_says_what_it_accepts_and_does():
    text = ' '.join(cli.build_parser('resnet').format_help().split())
    assert 'full timm' not in text and 'resnet18, resnet50, resnet101' in text and 'resnet_digits' in text
    assert 'lstsq' not in text and "'normal'" not in text  # refused choices are not offered
    assert 'random-weight (or cached' not in text and 'cached pretrained' not in text
    assert 'resnet_digits, trained on the UCI handwritten digits (models/digits), at W2/A8' in text
    assert '.npz' not in text
    for family, name in (('vit', 'vit_digits'), ('swin', 'swin_digits')):
        text = ' '.join(cli.build_parser(family).format_help().split())
        assert f'--demo {name}, trained on the UCI handwritten digits' in text and 'resnet' not in text.lower()
        assert "timm's pretrained weights if cached" in text  # the random demo of these scripts does look there


def test_the_random_resnet_demo_says_random_weights():
    assert 'timm weights' not in demo_mod.demo_line('resnet18', 4, 4, 'Percentile')
    assert 'random weights' in demo_mod.demo_line('resnet18', 4, 4, 'Percentile')
    assert 'timm weights if cached' in demo_mod.demo_line('deit_tiny', 4, 4, 'RepQ-ViT')


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / 'model.pth'
    path.write_bytes(b'x')  # --load's flags are checked against the meta, read separately
    return str(path)


@pytest.mark.parametrize('argv,bad', [
    (['--factor', '32'], ('factor', 32, 64)),
    (['--kernel_size', '3'], ('kernel_size', 3, 1)),
    (['--conv_a_bits', 'a_bits'], ('conv_a_bits', 'a_bits', '8')),
    (['--start_block', '1'], ('start_block', 1, 0)),
    (['--seed', '1'], ('seed', 1, 0)),
    (['--factor', '64', '--kernel_size', '1'], None),  # the saved values, typed: nothing contradicts
    ([], None),
])
def test_load_refuses_a_flag_that_contradicts_the_saved_model(saved, argv, bad):
    meta = {'factor': 64, 'kernel_size': 1, 'conv_a_bits': '8', 'start_block': 0, 'seed': 0, 'num_qwt': 512,
            'qwt_solver': 'inverse'}
    args = cli.parse_args('resnet', ['--load', saved, '--data_dir', os.path.dirname(saved), *argv])
    assert contradicting_flag(args, meta) == bad
    if bad:
        with pytest.raises(UserError, match=rf"^--{bad[0]} {bad[1]} does not match --load {re.escape(saved)}, made "
                                            rf"with --{bad[0]} {bad[2]}: leave --{bad[0]} out"):
            check_load_flags(args, meta)


def test_qwt_samples_is_held_against_the_images_the_fit_used(saved):
    args = cli.parse_args('vit', ['--load', saved, '--data_dir', os.path.dirname(saved), '--qwt_samples', '256'])
    assert contradicting_flag(args, {'num_qwt': 512}) == ('qwt_samples', 256, 512)


@pytest.mark.parametrize('family,argv,folder', [
    ('resnet', ['--demo'], 'output/demo_resnet_digits_w2a8'),
    ('resnet', ['--demo', '--a_bits', '4', '--conv_a_bits', 'a_bits'], 'output/demo_resnet_digits_w2a4_conv_a_bits-a_bits'),
    ('resnet', ['--demo', '--factor', '64'], 'output/demo_resnet_digits_w2a8_factor-64'),
    ('vit', ['--demo', '--qwt_solver', 'lstsq', '--start_block', '1'],
     'output/demo_vit_digits_w2a4_start_block-1_qwt_solver-lstsq'),
    ('vit', ['--demo', '--calib_search', 'per_channel'], 'output/demo_vit_digits_w2a4'),  # identical parameters
])
def test_a_flag_that_changes_the_computation_names_the_output_folder(family, argv, folder):
    assert cli.parse_args(family, argv).output_dir == folder


def test_the_flags_table_names_every_flag_of_every_script():
    table = re.search(r'### Flags\n(.*?)\n\n', README, re.S).group(1)
    for family in ('vit', 'swin', 'resnet'):
        for action in cli.build_parser(family)._actions:
            long = [s for s in action.option_strings if s.startswith('--') and s != '--help']
            if long:
                assert any(f'`{s}`' in table for s in long), (family, long)


def test_the_readme_documents_the_tools_flags():
    from utils.runner import flags
    assert '`--paper CSV ...`' in README and '`--script PATH`' in README
    for action in flags.build_parser()._actions:
        if action.option_strings and action.option_strings[0] != '-h':
            assert re.search(rf'{action.option_strings[0]}\b', README), action.option_strings


def test_one_resnet_demo_time_and_the_residual_the_log_prints():
    assert 'in\n16 s on' not in README and '16 s on this' not in README  # the demo table's bound is the one time
    from quant import qwt_conv
    assert 'mean abs residual' in open(qwt_conv.__file__).read() and 'mean abs residual' in README
    assert 'r2 nan' in qwt_conv.NAN_R2 and '`r2 nan`' in README


def test_pretrained_weights_are_not_committed_by_accident():
    assert '/pretrained_weights/' in open(os.path.join(ROOT, '.gitignore')).read().splitlines()


@pytest.mark.parametrize('env,set_to', [
    ({'WORLD_SIZE': '2'}, 'FATAL'),
    ({'WORLD_SIZE': '2', 'TORCH_CPP_LOG_LEVEL': 'INFO'}, 'INFO'),  # the user's wins
    ({'WORLD_SIZE': '1'}, None),
    ({}, None),
    ({'WORLD_SIZE': 'x'}, None),  # the flag check names it
])
def test_cpp_log_level_of_a_multi_process_run(env, set_to, monkeypatch):
    for name in ('WORLD_SIZE', 'TORCH_CPP_LOG_LEVEL'):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    environ = dict(env)
    quiet_cpp_logs(environ)
    assert environ.get('TORCH_CPP_LOG_LEVEL') == set_to
