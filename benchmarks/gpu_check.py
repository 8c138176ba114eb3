"""Everything a GPU must prove about this project, in one command and one report.

    bash benchmarks/gpu_check.sh                 # on a GPU node (not yet timed on one)
    bash benchmarks/gpu_check.sh --dry-run       # no GPU: the same plan on the CPU, tiny models (CI runs this)
    bash benchmarks/gpu_check.sh --only demos,timings --out output/gpu_check

The plan (``plan()``), the same with and without a GPU; only the device and the model sizes differ:
  environment   torch, CUDA, cuDNN, the device, timm (must be 0.4.12)
  cuda_tests    pytest tests/test_cuda.py: the `cuda` tests on the GPU (their CPU twins everywhere)
  nccl          a world-size-1 process group (NCCL; gloo in the dry run) through utils.core.distributed:
                broadcast, all_gather, object collectives, agree, all_reduce, barrier (no warning), and a
                QwT fit inside the group
  demos         each entry script's --demo on the device (FP, quantized, + QwT top-1)
  vs_published  the entry scripts end to end (default flags: inverse solver, 512 QwT images) and the published
                scripts (../shared/published-qwt, unchanged) on the same device, weights and images:
                logits of the quantized and the compensated model, and every block's W, b (the dry run
                requires them bit for bit; a GPU run reports them: cuDNN may pick other algorithms).
                Models: deit_small, swin_tiny, resnet18 on a GPU; tiny stand-ins of deit_tiny and swin_tiny
                in the dry run (no ResNet: the published one is a torchvision-layout class of its own, with
                no small stand-in). Without the published code this step is skipped, not passed.
  timings       calibration (and the published per-channel calibration, for the ratio), the QwT fit and
                evaluation images/s, with peak device memory per stage (reset after a warm-up)
Writes OUT/gpu_check.json and OUT/gpu_check.md after every step (a run cut short keeps what it measured),
prints a line at least every 30 s, and removes its scratch folder OUT/work at the end (--keep-work keeps it).
The last line says passed, or which steps failed and which comparisons did not run. Exit code: 0 when every
step asked for ran and passed; 1 when a step failed; 2 for a usage error; 3 when none failed but some did
not run (the published code not found, --budget-s spent).
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time

STARTED = time.monotonic()  # --budget-s counts from here, imports included
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # script_logits
from utils.core.files import read_json  # noqa: E402

PUBLISHED = os.path.normpath(os.path.join(ROOT, '..', 'shared', 'published-qwt'))
SCRIPTS = {'vit': 'qwt_vit_and_deit.py', 'swin': 'qwt_swin.py', 'resnet': 'qwt_resnet.py'}
PUBLISHED_SCRIPTS = {'vit': 'qwt_vit_and_deit.py', 'swin': 'qwt_swin.py', 'resnet': 'qwt_resnet_group_conv_only_percentile.py'}
# The published ResNet script reads its weights from here, under its working folder
PUBLISHED_RESNET_WEIGHTS = {'resnet18': 'resnet18_imagenet.pth.tar', 'resnet50': 'resnet50_imagenet.pth.tar',
                            'resnet101': 'resnet101-63fe2227.pth'}
# (family, table name, timm name) of the models compared with the published code and timed. The dry run
# has no ResNet: the published ResNet is its own torchvision-layout class, which has no small stand-in.
PARITY = (('vit', 'deit_small', 'deit_small_patch16_224'), ('swin', 'swin_tiny', 'swin_tiny_patch4_window7_224'),
          ('resnet', 'resnet18', 'resnet18'))
TIMED = (('vit', 'deit_small', 'deit_small_patch16_224'), ('vit', 'vit_base', 'vit_base_patch16_224'),
         ('swin', 'swin_tiny', 'swin_tiny_patch4_window7_224'))
DRY_PARITY = (('vit', 'deit_tiny', 'deit_tiny_patch16_224'), ('swin', 'swin_tiny', 'swin_tiny_patch4_window7_224'))
# The generated ImageNet-layout folder: 4 classes x 136 training images (the published code always draws
# 32 calibration + 512 QwT images), 16 val images per class (two batches of 32)
FOLDER = dict(classes=4, train_per_class=136, val_per_class=16, size=(48, 64))
PROGRESS_S = 20      # a line at least this often (the README promises one every 30 s): the margin is for load
GPU_BUDGET_S = 3600  # default --budget-s on a GPU
DRY_BUDGET_S = 1200  # default --budget-s of --dry-run, the bound the README states for its time: ~5x the 3 min 48 s
                     # measured before on a quiet 2-core CPU (a loaded one is far slower; CI fails when it is reached)
EXIT_NOT_RUN = 3     # nothing failed, but some step or comparison did not run
MIN_STEP_S = 5       # a step starts only with this much of the budget left


def _seconds(s):
    s = int(s)
    return f'{s // 60} min {s % 60} s' if s >= 60 else f'{s} s'


class Heartbeat:
    """The check's lines: each one printed through ``say``; a thread adds '<what runs now>: still running
    (<for how long>)' whenever nothing was printed for ``interval`` seconds, also inside a step's own process."""

    def __init__(self, interval, write=None):
        self.write = write or (lambda text: print(text, flush=True))
        self.interval, self.lock, self.stopped = interval, threading.Lock(), threading.Event()
        self.last, self.activity, self.since = time.monotonic(), None, None
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def say(self, text):
        with self.lock:
            self.write(text)
            self.last = time.monotonic()

    def doing(self, text):
        """What runs now: said at once, and again while it runs."""
        self.activity, self.since = text, time.monotonic()
        self.say(f'[....] {text}')

    def stop(self):
        self.activity = None
        self.stopped.set()
        self.thread.join()

    def _beat(self):
        while not self.stopped.wait(min(1.0, self.interval / 4)):
            now, activity = time.monotonic(), self.activity
            if activity and now - self.last >= self.interval:
                self.say(f'[....] {activity}: still running ({_seconds(now - self.since)})')


class Check:
    """One run of the plan: the device, the folders, the report written after every step."""

    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.device = 'cpu' if self.dry else 'cuda'
        self.out = os.path.abspath(args.out)
        self.work = os.path.join(self.out, 'work')
        self.steps = []
        self.cut_short = False  # a step's process was stopped because --budget-s ran out
        self.deadline = STARTED + args.budget_s
        self.lines = Heartbeat(args.progress_s)
        self.doing = self.lines.doing
        os.makedirs(self.work, exist_ok=True)

    def seconds_left(self):
        return self.deadline - time.monotonic()

    def partial(self, name, details):
        """A step's results so far, in the report (a run cut short keeps them)."""
        self.current = {'step': name, 'status': 'running', 'seconds': None, **details}
        write_report(self)

    def python(self, argv, timeout, cwd=None, env=None):
        """Run ``python argv`` (a step's own process: a hang or a crash cannot take the check down);
        returns (exit code, last 3000 characters of its output)."""
        env = {**os.environ, 'PYTHONWARNINGS': 'ignore', 'PYTHONUNBUFFERED': '1', **(env or {})}
        for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
            env.pop(k, None)
        budget = int(self.seconds_left()) < timeout
        timeout = max(1, min(timeout, int(self.seconds_left())))
        try:
            proc = subprocess.run([sys.executable, *argv], cwd=cwd or ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as e:
            self.cut_short = self.cut_short or budget
            out = (e.stdout or b'').decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
            return 124, (out + f'\n[timed out after {timeout} s]')[-3000:]
        return proc.returncode, (proc.stdout + proc.stderr)[-3000:]

    def record(self, name, status, seconds, details):
        self.current = None
        self.lines.activity = None
        self.steps.append({'step': name, 'status': status, 'seconds': round(seconds, 1), **details})
        write_report(self)
        mark = {'ok': 'ok  ', 'failed': 'FAIL', 'skipped': 'skip'}[status]
        self.lines.say(f'[{mark}] {name} ({seconds:.1f} s)' + (f": {details.get('why', '')}" if status != 'ok' else ''))


# ---- the steps ---------------------------------------------------------------------------------------

def step_environment(check):
    import timm
    import torch
    info = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,
            'cudnn': torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            'timm': timm.__version__, 'device': check.device, 'host': socket.gethostname()}
    if check.device == 'cuda':
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    capability='.'.join(map(str, torch.cuda.get_device_capability(0))),
                    device_count=torch.cuda.device_count())
    else:
        info['device_name'] = platform.processor() or platform.machine()
    if timm.__version__ != '0.4.12':
        return False, {**info, 'why': f'timm {timm.__version__}: the project needs 0.4.12 (carry its wheel)'}
    return True, info


def step_cuda_tests(check):
    check.doing('cuda_tests: pytest tests/test_cuda.py')
    code, tail = check.python(['-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/test_cuda.py'], 900)
    summary = next((ln for ln in reversed(tail.splitlines()) if ' passed' in ln or ' failed' in ln or 'error' in ln), '')
    return code == 0, {'summary': summary.strip('= '), **({} if code == 0 else {'why': 'pytest failed', 'log': tail})}


def step_nccl(check):
    check.doing(f"nccl: the group self-test ({'gloo' if check.dry else 'NCCL'})")
    code, tail = check.python([__file__, '--selftest-group', '--device', check.device], 300)
    if code != 0:
        return False, {'why': 'the group self-test failed', 'log': tail}
    return True, json.loads(tail.strip().splitlines()[-1])


def step_demos(check):
    results, ok = {}, True
    for family, script in SCRIPTS.items():
        if not os.path.isfile(os.path.join(ROOT, script)):
            continue
        out = os.path.join(check.work, f'demo_{family}')
        check.doing(f'demos: {script} --demo')
        start = time.perf_counter()
        code, tail = check.python([script, '--demo', '--device', check.device, '--output_dir', out], 600)
        res = read_json(os.path.join(out, 'result.json')) if code == 0 else None
        if res is None:
            ok = False
            results[family] = {'why': f'{script} --demo failed', 'log': tail}
            continue
        results[family] = {'model': res['model'], 'bits': f"W{res['w_bits']}/A{res['a_bits']}",
                           **{k: res.get(k) for k in ('fp_top1', 'ptq_top1', 'qwt_top1')},
                           'seconds': round(time.perf_counter() - start, 1)}
    return ok, {'demos': results}


def step_vs_published(check):
    data = generated_folder(check)
    parity = DRY_PARITY if check.dry else PARITY
    have_published = os.path.isfile(os.path.join(check.args.published, 'qwt_vit_and_deit.py'))
    results, ok = {}, True
    for family, name, timm_name in parity:
        check.partial('vs_published', {'models': results})
        check.doing(f'vs_published: {name}: random weights, then {SCRIPTS[family]}')
        weights = random_weights(check, timm_name, family)
        flags = ['--model', name, '--data_dir', data, '--w_bit', '4', '--a_bit', '4']
        tool = os.path.join(ROOT, 'benchmarks', 'script_logits.py')
        common = ['--tiny'] if check.dry else []
        ours_out = os.path.join(check.work, f'ours_{name}')
        start = time.perf_counter()
        code, tail = check.python([tool, '--out', os.path.join(check.work, f'ours_{name}.pth'), *common, '--',
                                   os.path.join(ROOT, SCRIPTS[family]), *flags, '--checkpoint', weights,
                                   '--allow_class_subset', '--device', check.device, '--output_dir', ours_out], 900)
        entry = {'ours_seconds': round(time.perf_counter() - start, 1)}
        if code != 0:
            ok = False
            results[name] = {**entry, 'why': f'{SCRIPTS[family]} failed', 'log': tail}
            continue
        res = read_json(os.path.join(ours_out, 'result.json'))
        entry.update({k: res.get(k) for k in ('ptq_top1', 'qwt_top1', 'num_qwt', 'num_calib')},
                     blocks_used=sum(b['used'] for b in res['qwt_blocks']), blocks=len(res['qwt_blocks']),
                     timings={k: res['timings'].get(k) for k in ('ptq', 'qwt', 'eval')})
        if not have_published:
            results[name] = {**entry, 'published': f'skipped: {check.args.published} not found'}
            continue
        check.doing(f'vs_published: {name}: the published {PUBLISHED_SCRIPTS[family]}')
        pub_cwd = os.path.join(check.work, f'published_{name}')  # the published code writes checkpoint/ here
        os.makedirs(os.path.join(pub_cwd, 'pretrained_weights'), exist_ok=True)
        if family == 'resnet':  # where the published ResNet script loads its weights from
            shutil.copyfile(weights, os.path.join(pub_cwd, 'pretrained_weights', PUBLISHED_RESNET_WEIGHTS[name]))
        start = time.perf_counter()
        code, tail = check.python([tool, '--out', os.path.join(check.work, f'published_{name}.pth'), *common,
                                   '--weights', weights, '--isolate', *(['--cpu'] if check.dry else []), '--',
                                   os.path.join(check.args.published, PUBLISHED_SCRIPTS[family]), *flags], 1200,
                                  cwd=pub_cwd)
        entry['published_seconds'] = round(time.perf_counter() - start, 1)
        if code != 0:
            ok = False
            results[name] = {**entry, 'why': 'the published script failed', 'log': tail}
            continue
        entry.update(compare_records(os.path.join(check.work, f'published_{name}.pth'),
                                     os.path.join(check.work, f'ours_{name}.pth')))
        same = all(entry[k]['identical'] for k in ('repq_logits', 'qwt_logits', 'compensation'))
        if check.dry and not same:  # one CPU, one thread count: the published arithmetic, bit for bit
            ok = False
            entry['why'] = 'logits or W, b differ from the published run on the same CPU'
        results[name] = entry
    if ok and not have_published:  # this project's runs went through, but nothing was compared
        return 'skipped', {'why': f'{check.args.published} not found: nothing compared with the published scripts '
                                  '(pass --published DIR)', 'models': results}
    return ok, {'models': results}


def step_timings(check):
    results, ok = {}, True
    for family, name, timm_name in TIMED:
        check.partial('timings', {'models': results})
        check.doing(f"timings: {name}{' (tiny stand-in)' if check.dry else ''}")
        code, tail = check.python([__file__, '--time-model', timm_name, '--device', check.device,
                                   *(['--tiny'] if check.dry else [])], 900)
        if code != 0:
            ok = False
            results[name] = {'why': 'timing failed', 'log': tail}
        else:
            results[name] = json.loads(tail.strip().splitlines()[-1])
    return ok, {'models': results}


def plan():
    """The steps, in order: the same for a GPU and for --dry-run."""
    return [('environment', step_environment), ('cuda_tests', step_cuda_tests), ('nccl', step_nccl),
            ('demos', step_demos), ('vs_published', step_vs_published), ('timings', step_timings)]


# ---- pieces --------------------------------------------------------------------------------------------

def generated_folder(check):
    from utils.run.demo import make_image_folder
    root = os.path.join(check.work, 'data')
    if not os.path.isdir(root):
        make_image_folder(root, **FOLDER)
    return root


def random_weights(check, timm_name, family):
    """A random-weight state dict of ``timm_name`` (its TINY stand-in in the dry run), with trained-like
    LayerNorms (BatchNorm statistics for a ResNet); the same file feeds this project's --checkpoint and the
    published script."""
    import torch
    path = os.path.join(check.work, f'{timm_name}.pth')
    if not os.path.isfile(path):
        torch.save(build(timm_name, check.dry and family != 'resnet').state_dict(), path)
    return path


def build(timm_name, tiny):
    """timm's random initialisation of ``timm_name`` (or its TINY stand-in), trained-like normalisation."""
    import timm
    import torch
    from models import randomize_batchnorms, randomize_layernorms
    from script_logits import tiny_model
    torch.manual_seed(0)
    model = tiny_model(timm_name, num_classes=1000) if tiny else timm.create_model(timm_name, pretrained=False)
    return randomize_batchnorms(model) if timm_name.startswith('resnet') else randomize_layernorms(model)


def compare_records(published_path, ours_path):
    """The published and our record side by side: the last two evaluations' logits (the quantized model,
    then the compensated one; ours evaluates both per batch) and each block's W, b."""
    import torch
    pub = torch.load(published_path, weights_only=False)
    ours = torch.load(ours_path, weights_only=False)
    n = len(ours['logits'])
    ours_repq, ours_qwt = ours['logits'][n - 2 * (n // 2)::2], ours['logits'][n - 2 * (n // 2) + 1::2]
    batches = len(ours_qwt)
    pub_repq, pub_qwt = pub['logits'][-2 * batches:-batches], pub['logits'][-batches:]
    out = {}
    for key, a, b in (('repq', pub_repq, ours_repq), ('qwt', pub_qwt, ours_qwt)):
        a, b = torch.cat(a), torch.cat(b)
        out[f'{key}_logits'] = {'images': len(a), 'identical': bool(torch.equal(a, b)),
                                'max_abs_diff': float((a - b).abs().max()), 'max_abs': float(a.abs().max()),
                                'top1_agreement': float((a.argmax(1) == b.argmax(1)).float().mean())}
    gaps = [max(float((w1 - w2).abs().max()) / max(float(w1.abs().max()), 1e-30),
                float((b1 - b2).abs().max()) / max(float(b1.abs().max()), 1e-30))
            for (w1, b1), (w2, b2) in zip(pub['compensation'], ours['compensation'])]
    out['compensation'] = {'blocks': [len(pub['compensation']), len(ours['compensation'])],
                           'identical': all(torch.equal(w1, w2) and torch.equal(b1, b2) for (w1, b1), (w2, b2)
                                            in zip(pub['compensation'], ours['compensation'])),
                           'max_relative_diff': max(gaps) if gaps else None}
    return out


# ---- the steps' own processes ----------------------------------------------------------------------------

def selftest_group(device_name):
    """A world-size-1 process group (NCCL on a GPU, gloo on the CPU) through utils.core.distributed, and a QwT
    fit inside it; prints one JSON line."""
    import warnings
    import torch
    import torch.distributed as dist
    from utils.core import distributed
    device = torch.device(device_name if device_name == 'cpu' else 'cuda:0')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        dist.init_process_group(backend, init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60),
                                **({'device_id': device} if device.type == 'cuda' else {}))
        t = torch.arange(6., device=device)
        assert torch.equal(distributed.broadcast(t.clone()), t)
        assert torch.equal(distributed.all_gather_cat(t), t)
        assert distributed.broadcast_object({'a': 1}) == {'a': 1} and distributed.all_gather_object(3) == [3]
        assert distributed.agree(('x', 0.5)) == ('x', 0.5)
        w = torch.ones(2, 2, device=device)
        assert distributed.agree_tensors(w)[0] is w
        assert torch.equal(distributed.all_reduce_sum(t.clone())[0], t)
        distributed.barrier()
        qwt = qwt_in_group(device)
        distributed.barrier()
        dist.destroy_process_group()
    # torch's guess of a barrier's GPU ("No device id is provided via `init_process_group` or `barrier`")
    noisy = [str(w.message)[:200] for w in seen if 'barrier' in str(w.message).lower()
             or 'no device id' in str(w.message).lower()]
    assert not noisy, noisy
    print(json.dumps({'backend': backend, 'collectives': 'broadcast, all_gather, broadcast_object, '
                      'all_gather_object, agree, agree_tensors, all_reduce, barrier', 'warnings': noisy, **qwt}))


def qwt_in_group(device):
    """RepQ-ViT + QwT of a small ViT inside the group (every decision goes through agree)."""
    import torch
    from timm.models.vision_transformer import VisionTransformer
    import models
    from quant import qwt_compensate, repq_vit
    torch.manual_seed(0)
    model = models.randomize_layernorms(models.prepare_model(VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10))).to(device)
    g = torch.Generator().manual_seed(1)
    calib, images = (torch.randn(n, 3, 32, 32, generator=g).to(device) for n in (8, 16))
    repq_vit(model, calib, 4, 4)
    stats = []
    qwt_compensate(model, images, batch_size=8, stats=stats)
    with torch.no_grad():
        logits = model(calib)
    assert torch.isfinite(logits).all()
    return {'qwt_blocks_used': sum(s['used'] for s in stats), 'qwt_blocks': len(stats)}


def time_model(timm_name, device_name, tiny):
    """Seconds of calibration (ours, and the published per-channel search on a copy, for the ratio), the
    default QwT fit (concatenate, float32 inverse; 512 images) and evaluation images/s (both models per
    batch), with the peak device memory of each stage (reset after a warm-up); prints one JSON line."""
    import copy
    import torch
    from models import prepare_model
    from quant import qwt_compensate, repq_vit, set_compensation
    device = torch.device(device_name)
    model = prepare_model(build(timm_name, tiny)).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    calib, qwt_images, eval_images = (torch.randn(n, 3, 224, 224, generator=gen).to(device) for n in (32, 512, 256))
    cuda = device.type == 'cuda'

    def stage(fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return seconds, (torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None)

    stage(lambda: model(calib))  # warm-up: kernels, cuBLAS / cuDNN handles
    published = copy.deepcopy(model)
    t_cal, m_cal = stage(lambda: repq_vit(model, calib, 4, 4))
    t_pub, m_pub = stage(lambda: repq_vit(published, calib, 4, 4, per_channel_loop=True))
    published = None  # free it before the QwT stage
    t_qwt, m_qwt = stage(lambda: qwt_compensate(model, qwt_images, batch_size=32))

    def evaluate():
        for x in eval_images.split(32):
            for on in (False, True):
                set_compensation(model, on)
                model(x)
    t_eval, m_eval = stage(evaluate)
    gib = (lambda m: None if m is None else round(m, 2))
    print(json.dumps({'calibration_s': round(t_cal, 2), 'published_calibration_s': round(t_pub, 2),
                      'calibration_speedup': round(t_pub / t_cal, 1), 'qwt_fit_s': round(t_qwt, 2),
                      'eval_images_per_s': round(len(eval_images) / t_eval, 1),
                      'peak_gib': {'calibration': gib(m_cal), 'published_calibration': gib(m_pub),
                                   'qwt': gib(m_qwt), 'eval': gib(m_eval)},
                      'model': timm_name + (' (tiny stand-in)' if tiny else '')}))


# ---- the report --------------------------------------------------------------------------------------

def write_report(check):
    steps = check.steps + ([check.current] if getattr(check, 'current', None) else [])
    report = {'dry_run': check.dry, 'device': check.device, 'budget_s': check.args.budget_s, 'steps': steps,
              'passed': bool(check.steps) and all(s['status'] == 'ok' for s in check.steps),
              'not_run': not_run(check.steps)}
    with open(os.path.join(check.out, 'gpu_check.json'), 'w') as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(check.out, 'gpu_check.md'), 'w') as f:
        f.write(markdown(report))


def not_run(steps):
    """'step: why' of each step asked for that did not run or could not run its comparison."""
    return [f"{s['step']}: {s.get('why', '')}" for s in steps if s['status'] == 'skipped']


def verdict(check):
    """(exit code, the run's last line)."""
    failed = [s['step'] for s in check.steps if s['status'] == 'failed']
    skipped = not_run(check.steps)
    where = f"report in {os.path.join(check.out, 'gpu_check.md')}"
    if check.args.keep_work:
        where += f'; scratch files kept in {check.work}'
    if not failed and not skipped:
        compared = any(s['step'] == 'vs_published' for s in check.steps)
        what = f" (dry run: CPU, tiny models{', no ResNet compared' if compared else ''})" if check.dry else ''
        return 0, f'gpu_check: passed{what}; {where}'
    text = f"FAILED: {', '.join(failed)}" if failed else 'NOT PASSED (nothing failed)'
    if skipped:
        text += f"; not run: {'; '.join(skipped)}"
    return (1 if failed else EXIT_NOT_RUN), f'gpu_check: {text}; {where}'


def markdown(report):
    env = next((s for s in report['steps'] if s['step'] == 'environment'), {})
    lines = [f"# GPU check{' (dry run: CPU, tiny models)' if report['dry_run'] else ''}", '',
             f"{env.get('device_name', '?')}; torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, "
             f"cuDNN {env.get('cudnn')}, timm {env.get('timm', '?')}", '',
             '| step | status | seconds |', '|---|---|---|']
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in report['steps']]
    if report['not_run']:
        lines += ['', 'Not run: ' + '; '.join(report['not_run'])]
    for s in report['steps']:
        if s['step'] == 'environment':
            continue
        details = {k: v for k, v in s.items() if k not in ('step', 'status', 'seconds')}
        lines += ['', f"## {s['step']}", '', '```json', json.dumps(details, indent=2), '```']
    return '\n'.join(lines) + '\n'


def nested_why(details):
    """'<model>: <why>; ...' of the models or demos of a step that failed in some of them (a timeout said so)."""
    parts = []
    for key in ('models', 'demos'):
        for name, entry in (details.get(key) or {}).items():
            if isinstance(entry, dict) and entry.get('why'):
                timed_out = (entry.get('log') or '').rstrip().rsplit('\n', 1)[-1]
                parts.append(f"{name}: {entry['why']}" + (f' {timed_out}' if timed_out.startswith('[timed out') else ''))
    return '; '.join(parts)


def run_step(check, name, fn):
    """Run step ``fn`` and record it: ok, failed, or skipped (its comparison could not run; the budget was
    spent before it or during it, which stopped its process)."""
    budget = f'--budget-s {check.args.budget_s:g}'
    if check.seconds_left() < MIN_STEP_S:
        check.record(name, 'skipped', 0, {'why': f'{budget} spent'})
        return
    check.doing(name)
    start = time.perf_counter()
    try:
        ok, details = fn(check)
    except Exception as e:  # a step's own bug must not hide the others' results
        ok, details = False, {'why': f'{type(e).__name__}: {e}'}
    status = ok if isinstance(ok, str) else 'ok' if ok else 'failed'
    if status == 'failed' and 'why' not in details:
        details = {**details, 'why': nested_why(details)}
    if status == 'failed' and check.cut_short:  # stopped by the budget: it did not fail, it did not end
        status, details = 'skipped', {**details, 'why': f'{budget} spent during it'}
    check.cut_short = False
    check.record(name, status, time.perf_counter() - start, details)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dry-run', dest='dry_run', action='store_true',
                   help='no GPU: run the same plan on the CPU with tiny models')
    p.add_argument('--out', default=os.path.join(ROOT, 'output', 'gpu_check'), help='report folder')
    p.add_argument('--only', default=None, help='comma-separated steps to run (default: all): '
                   + ', '.join(name for name, _ in plan()))
    p.add_argument('--budget-s', dest='budget_s', type=float, default=None,
                   help='stop all work after this many seconds (a step still running is stopped); what is left is '
                        f'reported as not run (default {GPU_BUDGET_S}; with --dry-run {DRY_BUDGET_S})')
    p.add_argument('--keep-work', dest='keep_work', action='store_true',
                   help='keep the scratch folder OUT/work (generated images, weights, each run\'s output); by default '
                        'it is removed at the end')
    p.add_argument('--progress-s', dest='progress_s', type=float, default=PROGRESS_S, help=argparse.SUPPRESS)
    p.add_argument('--published', default=PUBLISHED, help='the published QwT code (default ../shared/published-qwt)')
    p.add_argument('--selftest-group', dest='selftest_group', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--time-model', dest='time_model', default=None, help=argparse.SUPPRESS)
    p.add_argument('--device', default=None, help=argparse.SUPPRESS)
    p.add_argument('--tiny', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.selftest_group:
        return selftest_group(args.device)
    if args.time_model:
        return time_model(args.time_model, args.device, args.tiny)
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        p.error('no CUDA device is visible: run with --dry-run (the same plan on the CPU with tiny models)')
    steps = plan()
    wanted = set(args.only.split(',')) if args.only else {name for name, _ in steps}
    unknown = wanted - {name for name, _ in steps}
    if unknown:
        p.error(f"--only {','.join(sorted(unknown))}: not a step; choose from {', '.join(n for n, _ in steps)}")
    if args.budget_s is None:
        args.budget_s = DRY_BUDGET_S if args.dry_run else GPU_BUDGET_S
    check = Check(args)
    try:
        for name, fn in steps:
            if name in wanted:
                run_step(check, name, fn)
    finally:
        check.lines.stop()
        if not args.keep_work:
            shutil.rmtree(check.work, ignore_errors=True)
    code, line = verdict(check)
    print(line, flush=True)
    return code


if __name__ == '__main__':
    sys.exit(main())
