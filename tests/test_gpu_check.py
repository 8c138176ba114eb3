"""benchmarks/gpu_check.py, the one command a GPU runs (issue 24): its plan, its dry run on the CPU, and the
pieces that judge a GPU run (the logits recorder, the side-by-side comparison)."""
import json
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

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
    assert proc.stdout.splitlines()[-1] == f'gpu_check: passed (dry run: CPU, tiny models); report in {tmp_path}/gpu_check.md'
    assert '[....] nccl: the group self-test (gloo)' in proc.stdout.splitlines()
    assert not (tmp_path / 'work').exists()  # scratch files removed (no --keep-work)
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert report['dry_run'] is True and report['device'] == 'cpu' and report['passed'] is True
    assert report['not_run'] == [] and report['budget_s'] == gpu_check.DRY_BUDGET_S
    steps = {s['step']: s for s in report['steps']}
    assert list(steps) == ['environment', 'nccl'] and all(s['status'] == 'ok' for s in steps.values())
    assert steps['environment']['timm'] == '0.4.12'
    assert steps['nccl']['backend'] == 'gloo' and steps['nccl']['warnings'] == []
    assert steps['nccl']['qwt_blocks'] == 3 and steps['nccl']['qwt_blocks_used'] == 3
    md = (tmp_path / 'gpu_check.md').read_text()
    assert md.startswith('# GPU check (dry run: CPU, tiny models)') and '| nccl | ok |' in md


def test_a_spent_budget_and_a_bad_step_name_are_not_a_pass(tmp_path):
    gpu = [sys.executable, os.path.join(ROOT, 'benchmarks', 'gpu_check.py'), '--dry-run', '--out', str(tmp_path)]
    proc = subprocess.run([*gpu, '--only', 'environment', '--budget-s', '0', '--keep-work'], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3 and '[skip] environment' in proc.stdout
    assert proc.stdout.splitlines()[-1] == (f'gpu_check: NOT PASSED (nothing failed); not run: environment: --budget-s 0 '
                                            f'spent; report in {tmp_path}/gpu_check.md; scratch files kept in '
                                            f'{tmp_path}/work')
    assert (tmp_path / 'work').is_dir()
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert report['passed'] is False and report['not_run'] == ['environment: --budget-s 0 spent']
    proc = subprocess.run([*gpu, '--only', 'environment,gpu'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and '--only gpu: not a step; choose from environment, cuda_tests' in proc.stderr


def test_a_line_every_interval_inside_a_step_and_the_budget_stops_the_step(tmp_path, monkeypatch):
    """A step whose process prints nothing: with a 0.5 s interval no two lines are much more than 0.5 s apart;
    the budget stops the process on time, and the step is reported not run, not failed."""
    monkeypatch.setattr(gpu_check, 'MIN_STEP_S', 0.5)
    check = gpu_check.Check(SimpleNamespace(dry_run=True, out=str(tmp_path), budget_s=2.5, progress_s=0.5))
    lines = []
    check.lines.write = lambda text: lines.append((time.monotonic(), text))
    check.deadline = time.monotonic() + 2.5
    start = time.monotonic()
    try:
        gpu_check.run_step(check, 'long', lambda c: (c.python(['-c', 'import time; time.sleep(60)'], 600)[0] == 0, {}))
    finally:
        check.lines.stop()
    assert time.monotonic() - start < 2.5 + 3  # stopped at the budget, not after 60 s
    text = [t for _, t in lines]
    assert text[0] == '[....] long' and sum(t.startswith('[....] long: still running (') for t in text) >= 3, text
    gaps = [b - a for (a, _), (b, _) in zip([(start, '')] + lines, lines)]
    assert max(gaps) < 0.5 + 1.0, (gaps, text)
    assert re.fullmatch(r'\[skip\] long \(\d\.\d s\): --budget-s 2\.5 spent during it', text[-1]), text
    assert check.steps[0]['status'] == 'skipped'


def test_a_failed_step_says_which_of_its_models_failed_and_why(tmp_path):
    check = gpu_check.Check(SimpleNamespace(dry_run=True, out=str(tmp_path), budget_s=10 ** 6, progress_s=30))  # budget from process start
    lines = []
    check.lines.write = lines.append
    details = {'models': {'deit_tiny': {'published_seconds': 1.0},
                          'swin_tiny': {'why': 'the published script failed', 'log': 'block 3\n[timed out after 1200 s]'}}}
    try:
        gpu_check.run_step(check, 'vs_published', lambda c: (False, details))
    finally:
        check.lines.stop()
    assert lines[-1].endswith('): swin_tiny: the published script failed [timed out after 1200 s]')
    assert check.steps[0]['status'] == 'failed' and check.steps[0]['models'] == details['models']


def fake_vs_published(tmp_path, monkeypatch, dry, published):
    """step_vs_published with this project's runs faked (each writes a result.json at once): (status, details,
    the models run)."""
    monkeypatch.setattr(gpu_check, 'generated_folder', lambda check: str(tmp_path / 'data'))
    os.makedirs(tmp_path, exist_ok=True)
    (tmp_path / 'w.pth').write_bytes(b'')
    monkeypatch.setattr(gpu_check, 'random_weights', lambda check, timm_name, family: str(tmp_path / 'w.pth'))
    monkeypatch.setattr(gpu_check, 'compare_records', lambda *a: {k: {'identical': True} for k in (
        'repq_logits', 'qwt_logits', 'compensation')})
    models = []

    def python(argv, timeout, cwd=None, env=None):
        models.append(argv[argv.index('--model') + 1])
        if '--output_dir' not in argv:  # the published script
            return 0, ''
        out = argv[argv.index('--output_dir') + 1]
        os.makedirs(out)
        with open(os.path.join(out, 'result.json'), 'w') as f:
            json.dump({'repq_top1': 1.0, 'qwt_top1': 2.0, 'num_qwt': 512, 'num_calib': 32,
                       'qwt_blocks': [{'used': True}], 'timings': {'repq': 1, 'qwt': 1, 'eval': 1}}, f)
        return 0, ''
    check = SimpleNamespace(dry=dry, device='cpu' if dry else 'cuda', work=str(tmp_path / 'work'), python=python,
                            args=SimpleNamespace(published=published), partial=lambda *a: None, doing=lambda *a: None)
    ok, details = gpu_check.step_vs_published(check)
    return ok, details, models


def test_without_the_published_code_the_comparison_is_skipped_and_the_run_not_passed(tmp_path, monkeypatch):
    missing = str(tmp_path / 'no_published')
    status, details, models = fake_vs_published(tmp_path, monkeypatch, True, missing)
    assert status == 'skipped' and models == ['deit_tiny', 'swin_tiny']
    assert details['why'] == (f'{missing} not found: nothing compared with the published scripts (pass '
                              '--published DIR)')
    assert all(m['published'] == f'skipped: {missing} not found' for m in details['models'].values())
    steps = [{'step': 'environment', 'status': 'ok'}, {'step': 'vs_published', 'status': status, **details}]
    check = SimpleNamespace(steps=steps, out='/o', work='/o/work', dry=True, args=SimpleNamespace(keep_work=False))
    assert gpu_check.verdict(check) == (3, f"gpu_check: NOT PASSED (nothing failed); not run: vs_published: "
                                           f"{details['why']}; report in /o/gpu_check.md")
    steps.insert(1, {'step': 'demos', 'status': 'failed'})
    assert gpu_check.verdict(check)[0] == 1 and gpu_check.verdict(check)[1].startswith(
        f"gpu_check: FAILED: demos; not run: vs_published: {missing} not found")


def test_the_readme_says_what_each_mode_compares_and_how_long_a_dry_run_takes(tmp_path, monkeypatch):
    """The README's GPU-check paragraph: the models compared in each mode are those the step runs, the dry
    run's time bound is the dry run's default budget, the progress interval is kept."""
    readme = open(os.path.join(ROOT, 'README.md')).read()
    section = ' '.join(readme[readme.index('### The GPU check'):readme.index('## Tests')].split())
    names = lambda text: re.split(r', | and ', text)  # noqa: E731
    gpu, dry = re.search(r'Models compared with the published code: on a GPU (.+?); in the dry run tiny stand-ins '
                         r'of (.+?) \(no ResNet', section).groups()
    published = tmp_path / 'published'
    published.mkdir()
    (published / 'qwt_vit_and_deit.py').write_text('')
    ran = {}
    for mode in (False, True):  # ours, then the published script, for each model
        status, _, ran[mode] = fake_vs_published(tmp_path / str(mode), monkeypatch, mode, str(published))
        assert status is True
    assert names(gpu) == ran[False][::2] == [m for _, m, _ in gpu_check.PARITY]
    assert names(dry) == ran[True][::2] == [m for _, m, _ in gpu_check.DRY_PARITY]
    assert not any(f == 'resnet' for f, _, _ in gpu_check.DRY_PARITY)
    timed = re.search(r'Models timed: (.+?) \(tiny stand-ins in the dry run\)', section).group(1)
    assert names(timed) == [m for _, m, _ in gpu_check.TIMED]
    bounds = re.search(r'`--budget-s` bounds the whole run \(default (\d+) min; with `--dry-run` (\d+) min, which '
                       r"bounds the dry run's time\)", section).groups()
    assert [int(b) * 60 for b in bounds] == [gpu_check.GPU_BUDGET_S, gpu_check.DRY_BUDGET_S]
    assert 'one at least every 30 s while a step runs' in section and gpu_check.PROGRESS_S <= 30 - 2


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
