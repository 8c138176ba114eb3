"""The CPU allocator setting: which mallopt calls it makes, when it stays off, and that the pipeline
applies it on the CPU."""
import ctypes
import os
import subprocess
import sys

import pytest

from conftest import ROOT, save_random_checkpoint
from utils.run import cli, pipeline
from quant.ptq import project as project_ptq
from utils.core import allocator
from utils.run.demo import make_image_folder


class FakeLibc:
    def __init__(self, result=1):
        self.calls, self.result = [], result

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.result


def test_sets_mmap_max_zero_and_largest_trim_threshold():
    libc = FakeLibc()
    assert allocator.keep_freed_memory(libc) is True
    assert libc.calls == [(-4, 0), (-1, 2 ** 31 - 1)]  # M_MMAP_MAX, M_TRIM_THRESHOLD


def test_environment_variable_leaves_glibc_alone(monkeypatch):
    monkeypatch.setenv('QWT_SYSTEM_MALLOC', '1')
    libc = FakeLibc()
    assert allocator.keep_freed_memory(libc) is False
    assert libc.calls == []


def test_refused_or_missing_mallopt_reports_false():
    libc = FakeLibc(result=0)
    assert allocator.keep_freed_memory(libc) is False
    assert libc.calls == [(-4, 0)]
    assert allocator.keep_freed_memory(object()) is False  # a C library without mallopt


def test_real_glibc_accepts_the_setting():
    """In a child process: the setting stays with the process that makes it, not the test session."""
    try:
        ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):
        pytest.skip('no glibc here')
    env = {k: v for k, v in os.environ.items() if k != 'QWT_SYSTEM_MALLOC'}
    proc = subprocess.run([sys.executable, '-c', 'from utils.core import allocator; print(allocator.keep_freed_memory())'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == 'True'


def test_pipeline_applies_it_on_the_cpu(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, 'keep_freed_memory', lambda: calls.append(1) or True)

    class Stop(RuntimeError):
        pass

    def stop(*args, **kwargs):
        raise Stop()
    monkeypatch.setattr(project_ptq, 'repq_vit', stop)
    root = make_image_folder(str(tmp_path / 'imagenet'))
    ckpt = save_random_checkpoint('deit_tiny_patch16_224', str(tmp_path / 'deit_tiny.pth'))
    with pytest.raises(Stop):
        cli.main('vit', ['--model', 'deit_tiny', '--data_dir', root, '--allow_class_subset', '--checkpoint', ckpt, '--batch_size', '4',
                              '--qwt_samples', '8', '--num_workers', '0', '--device', 'cpu',
                              '--output_dir', str(tmp_path / 'out')])
    assert calls == [1]
