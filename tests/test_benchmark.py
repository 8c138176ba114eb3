"""The benchmark script runs end to end on a small model (its timings are not asserted: they belong
in BENCHMARKS.md). The published procedure it compares against is checked in test_reparam/test_qwt."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import bench_pipeline  # noqa: E402


def labels(rows):
    return [label for label, _ in rows]


def test_calibration_only_rows(capsys):
    rows, naive = bench_pipeline.main(['--model', 'deit_tiny', '--calibration-only', '--calib_images', '2'])
    assert naive == {}
    assert labels(rows) == ['full-precision forward of the calibration batch',
                            'calibration (1st forward + quantizer init)', 'reparameterisation',
                            're-calibration (step 3: weight quantizers only)',
                            '  quantizer initialisation (calibration minus a calibrated forward)']
    assert all(sec >= 0 for _, sec in rows[:4])
    out = capsys.readouterr().out
    assert out.startswith('# deit_tiny W4/A4 on cpu') and '| peak memory |' in out


@pytest.mark.parametrize('extra, allocator_calls', [([], 1), (['--system-malloc'], 0)])
def test_full_run_rows(capsys, monkeypatch, extra, allocator_calls):
    calls = []
    monkeypatch.setattr(bench_pipeline, 'keep_freed_memory', lambda: calls.append(1) or True)
    rows, naive = bench_pipeline.main(['--model', 'deit_tiny', '--calib_images', '2', '--qwt_images', '4',
                                       '--eval_images', '2', '--batch_size', '2', *extra])
    assert naive == {}
    names = labels(rows)
    assert names[-1] == 'eval rate, both models per batch (images/s)' and rows[-1][1] > 0
    assert 'QwT, 4 images (normal equations), total' in names
    assert '| eval rate, both models per batch (images/s) |' in capsys.readouterr().out
    assert len(calls) == allocator_calls
