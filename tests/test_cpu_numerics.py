"""The --demo runs' CPU pin (utils.core.cpu_numerics): set before torch loads, never after; the log line says
what runs, and where the figures do not hold (torch loaded first, another architecture)."""
import subprocess
import sys

from conftest import ROOT
from utils.core import cpu_numerics as cn

PINNED = dict(cn.PIN)


def test_the_pin_is_the_level_every_x86_64_cpu_runs_and_replaces_the_users_values():
    assert PINNED == {'ATEN_CPU_CAPABILITY': 'default', 'MKL_CBWR': 'COMPATIBLE', 'ONEDNN_MAX_CPU_ISA': 'SSE41',
                      'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    environ = {'ATEN_CPU_CAPABILITY': 'avx512', 'MKL_CBWR': 'AUTO', 'PATH': '/bin'}
    assert cn.pin_cpu_numerics(environ, modules={}) is True
    assert environ == {**PINNED, 'PATH': '/bin'} and cn.is_pinned(environ)


def test_nothing_changes_once_torch_is_loaded():
    environ = {'ATEN_CPU_CAPABILITY': 'avx2'}
    assert cn.pin_cpu_numerics(environ, modules={'torch': object()}) is False
    assert environ == {'ATEN_CPU_CAPABILITY': 'avx2'} and not cn.is_pinned(environ)
    assert 'AVX2 kernels, not pinned (the digits demos pin them' in cn.pin_line('AVX2', 1, environ, 'x86_64')


def test_the_log_line_names_the_settings_and_another_architecture():
    line = cn.pin_line('DEFAULT', 1, PINNED, 'x86_64')
    assert line.startswith('demo: 1 CPU thread(s), DEFAULT kernels (ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE, '
                           'ONEDNN_MAX_CPU_ISA=SSE41, OMP_NUM_THREADS=1, MKL_NUM_THREADS=1): the same figures on '
                           'every x86-64 CPU')
    assert 'other architectures (aarch64, ...) can differ' in line
    assert "this is aarch64, not x86-64: its kernels round differently" in cn.pin_line('DEFAULT', 1, PINNED, 'aarch64')


def test_a_demo_command_line_pins_before_torch_loads_and_torch_runs_the_default_kernels():
    code = ("import sys; from utils.run import cli; a = cli.parse_args('vit', ['--demo']); import torch; "
            "print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())")
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={'PATH': '/usr/bin:/bin', 'ATEN_CPU_CAPABILITY': 'avx2'})
    assert out.stdout.split() == ['DEFAULT', '1'], out.stderr[-2000:]
    for argv in ("'--model', 'deit_tiny', '--data_dir', '.'", "'--demo', '--model', 'deit_tiny'"):
        code = (f"from utils.run import cli; a = cli.parse_args('vit', [{argv}]); "
                "import os; print(sorted(set(os.environ) & {'ATEN_CPU_CAPABILITY', 'MKL_CBWR', 'ONEDNN_MAX_CPU_ISA'}))")
        out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={'PATH': '/usr/bin:/bin'})
        assert out.stdout.strip() == '[]', out.stderr[-2000:]  # full-size models keep the fastest kernels
