"""benchmarks/gpu_check.py, the one command a GPU runs (issue 24): its plan, its dry run on the CPU, and the
pieces that judge a GPU run (the logits recorder, the side-by-side comparison)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import gpu_check  # noqa: E402
import script_logits  # noqa: E402


def test_the_plan_is_the_documented_one_for_both_modes():
    names = [name for name, _ in gpu_check.plan()]
    assert names == ['environment', 'cuda_tests', 'nccl', 'demos', 'vs_published', 'timings']
    for name in names:  # the module's docstring (its --help) lists every step
        assert f'\n  {name}' in gpu_check.__doc__
    assert [m for _, m, _ in gpu_check.PARITY] == ['deit_small', 'swin_tiny', 'resnet18']
    assert [m for _, m, _ in gpu_check.TIMED] == ['deit_small', 'vit_base', 'swin_tiny']


def test_dry_run_of_the_first_steps(tmp_path):
    """The real command line, as CI runs the whole dry run: a report, one ok line per step, exit 0; the group
    self-test went through every collective without a warning and fitted QwT inside the group."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'gpu_check.py'), '--dry-run', '--only',
                           'environment,nccl', '--out', str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert report['dry_run'] is True and report['device'] == 'cpu' and report['passed'] is True
    steps = {s['step']: s for s in report['steps']}
    assert list(steps) == ['environment', 'nccl'] and all(s['status'] == 'ok' for s in steps.values())
    assert steps['environment']['timm'] == '0.4.12'
    assert steps['nccl']['backend'] == 'gloo' and steps['nccl']['warnings'] == []
    assert steps['nccl']['qwt_blocks'] == 3 and steps['nccl']['qwt_blocks_used'] == 3
    md = (tmp_path / 'gpu_check.md').read_text()
    assert md.startswith('# GPU check (dry run: CPU, tiny models)') and '| nccl | ok |' in md


def test_a_spent_budget_and_a_bad_step_name_are_not_a_pass(tmp_path):
    gpu = [sys.executable, os.path.join(ROOT, 'benchmarks', 'gpu_check.py'), '--dry-run', '--out', str(tmp_path)]
    proc = subprocess.run([*gpu, '--only', 'environment', '--budget-s', '0'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and '[skip] environment' in proc.stdout
    assert json.loads((tmp_path / 'gpu_check.json').read_text())['passed'] is False
    proc = subprocess.run([*gpu, '--only', 'environment,gpu'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and '--only gpu: not a step; choose from environment, cuda_tests' in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_without_a_gpu_it_asks_for_the_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'gpu_check.py'), '--out', str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert 'no CUDA device is visible: run with --dry-run (the same plan on the CPU with tiny models)' in proc.stderr


class _Net(nn.Module):
    """A stem, two blocks and a head; returns (features, logits) like the published quantized ViT."""

    def __init__(self):
        super().__init__()
        self.stem, self.blocks, self.head = nn.Conv2d(3, 4, 4, 4), nn.Sequential(nn.Identity(), nn.Identity()), nn.Linear(4, 5)

    def forward(self, x):
        f = self.blocks(self.stem(x).flatten(2).mean(-1))
        return f, self.head(f)


def test_only_whole_model_calls_are_recorded():
    """A script that also calls parts of the model directly (as QwT does block by block): only calls from
    outside any module, on an image batch, returning [batch, classes], count; a (features, logits) pair by
    its logits."""
    net, x = _Net(), torch.randn(3, 3, 8, 8)
    calls = script_logits.RootCalls()
    with calls.installed(), torch.no_grad():
        net.stem(x)  # 4-D output: not logits
        net.blocks(torch.randn(3, 4))  # not an image batch
        _, first = net(x)
        second = nn.Linear(3 * 8 * 8, 7)(x.flatten(1))  # [3, 7] but a 2-D input: not a whole model
        _, third = net(2 * x)
    assert len(calls.outputs) == 2 and calls.root is net
    assert torch.equal(calls.outputs[0], first) and torch.equal(calls.outputs[1], third)
    assert second.shape == (3, 7)


def test_compare_records_aligns_the_two_orders(tmp_path):
    """The published scripts evaluate all batches of the quantized model, then all of the compensated one;
    ours evaluates both per batch. Two batches each, one logit perturbed by 0.25 in the compensated model."""
    g = torch.Generator().manual_seed(0)
    calib, r0, r1, q0, q1 = (torch.randn(4, 10, generator=g) for _ in range(5))
    w, b = torch.randn(6, 6, generator=g), torch.randn(6, generator=g)
    pub = {'logits': [calib, calib, r0, r1, q0, q1], 'compensation': [(w, b)]}
    q1_ours = q1.clone()
    q1_ours[2, 3] += 0.25
    ours = {'logits': [calib, r0, q0, r1, q1_ours], 'compensation': [(w, b * 1.5)]}
    torch.save(pub, tmp_path / 'p.pth')
    torch.save(ours, tmp_path / 'o.pth')
    out = gpu_check.compare_records(str(tmp_path / 'p.pth'), str(tmp_path / 'o.pth'))
    assert out['repq_logits']['identical'] and out['repq_logits']['images'] == 8
    assert out['repq_logits']['max_abs_diff'] == 0.0 and out['repq_logits']['top1_agreement'] == 1.0
    assert not out['qwt_logits']['identical'] and out['qwt_logits']['max_abs_diff'] == pytest.approx(0.25)
    assert out['compensation']['identical'] is False and out['compensation']['blocks'] == [1, 1]
    assert out['compensation']['max_relative_diff'] == pytest.approx(0.5)


def test_tiny_stand_ins_keep_the_class_and_the_input_size():
    vit = script_logits.tiny_model('deit_small_patch16_224', num_classes=1000)
    swin = script_logits.tiny_model('swin_tiny_patch4_window7_224', num_classes=1000, drop_path_rate=0.0)
    assert type(vit).__name__ == 'VisionTransformer' and (vit.embed_dim, len(vit.blocks)) == (48, 2)
    assert type(swin).__name__ == 'SwinTransformer' and swin.embed_dim == 24
    with torch.no_grad():
        assert vit(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
        assert swin(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
