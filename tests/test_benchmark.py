"""The benchmark script runs end to end on a small model: one cheap smoke run. Its timings are not
asserted (they belong in BENCHMARKS.md); the published procedure it compares against is checked in
test_reparam / test_qwt."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import bench_pipeline  # noqa: E402


def test_smoke_run(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(bench_pipeline, 'keep_freed_memory', lambda: calls.append(1) or True)
    rows, naive = bench_pipeline.main(['--model', 'deit_tiny', '--calib_images', '2', '--qwt_images', '4',
                                       '--eval_images', '2', '--batch_size', '2'])
    assert naive == {} and calls == [1]
    labels = [label for label, _ in rows]
    assert labels[:4] == ['full-precision forward of the calibration batch',
                          'calibration (1st forward + quantizer init)', 'reparameterisation',
                          're-calibration (step 3: weight quantizers only)']
    assert 'QwT, 4 images (normal equations), total' in labels
    assert labels[-1] == 'eval rate, both models per batch (images/s)'
    out = capsys.readouterr().out
    assert out.startswith('# deit_tiny W4/A4 on cpu') and '| peak memory |' in out


@pytest.mark.parametrize('extra, allocator_calls', [([], 1), (['--system-malloc'], 0)])
def test_system_malloc_flag(monkeypatch, extra, allocator_calls):
    """The allocator setting is made before anything is built, unless --system-malloc."""
    calls = []

    class Stop(Exception):
        pass
    monkeypatch.setattr(bench_pipeline, 'keep_freed_memory', lambda: calls.append(1) or True)
    monkeypatch.setattr(bench_pipeline, 'random_model', lambda *a: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        bench_pipeline.main(['--model', 'deit_tiny', '--device', 'cpu', '--calib_images', '1', '--qwt_images', '1',
                             '--eval_images', '1', *extra])
    assert len(calls) == allocator_calls


def test_help_starts_with_the_usage_not_a_warning():
    """timm 0.4.12's torch.jit.script FutureWarning is filtered as in the entry scripts."""
    import subprocess
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks', 'bench_pipeline.py')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONWARNINGS'}
    proc = subprocess.run([sys.executable, script, '--help'], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stderr == '' and proc.stdout.startswith('usage: bench_pipeline.py')
