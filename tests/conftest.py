"""Shared test setup: the repository root on sys.path, and tiny random timm models (nothing is
downloaded) prepared like the real ones."""
import contextlib
import os
import subprocess
import sys

# One CPU thread per test process (pytest.ini runs a worker per core; threads of one worker spinning against
# another's make both slower), and for the scripts the tests start. A count set outside wins.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA GPU (skipped without one); run them alone with '
                                       '`python -m pytest -q -m cuda tests`')
    config.addinivalue_line('markers', 'slow: runs the README\'s figure runs (pinned CPU kernels) or the published code '
                                       'itself: about half of the suite\'s time; `-m "not slow"` leaves them out while '
                                       'you work (the suite, as CI runs it, includes them)')
    config.addinivalue_line('markers', 'slurm: needs a SLURM cluster (.ci/slurm/start makes one on localhost; skipped '
                                       'without one, failed instead where QWT_REQUIRE_SLURM is set)')


# The test files whose runs take a minute or more, longest first. They start first (pytest.ini turns off
# xdist's ordering by test count, which starts them last), so that no worker ends the suite alone on one.
SLOW_FIRST = ('test_readme_demo.py', 'test_digits.py', 'test_ptq_demos.py', 'test_resnet_run.py',
              'test_resnet_published.py', 'test_draws.py', 'test_published.py', 'test_scripts.py', 'test_slurm.py')


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(SLOW_FIRST)))  # stable: the rest as collected


@pytest.fixture(autouse=True)
def _glibc_allocator_untouched(monkeypatch):
    """An in-process pipeline run on the CPU would change this process's malloc settings for every
    later test; the real call is tested in a subprocess (test_allocator.py)."""
    from utils.run import pipeline
    monkeypatch.setattr(pipeline, 'keep_freed_memory', lambda: False)


@contextlib.contextmanager
def torch_flags(*settings):
    """Set flags of torch's backend modules, ``(module, name, value)`` each, and restore their values on
    exit. Not monkeypatch: ``torch.backends.cuda.matmul`` serves its flags through ``__getattr__``, and
    pytest >= 9.2's undo deletes such an attribute instead of restoring it (an error at teardown)."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in settings]
    try:
        for module, name, value in settings:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def randomize_layernorms(model, seed=0):
    """Random LayerNorm gamma/beta. A random-init LayerNorm (gamma=1, beta=0) makes the features
    exactly collinear with the bias column, which makes the float32 inverse meaningless."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model


def make_tiny_vit(seed=0, distilled=False, prepare=True):
    from timm.models.vision_transformer import VisionTransformer
    import models
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10,
                          distilled=distilled, drop_path_rate=0.0)
    randomize_layernorms(m, seed)
    return models.prepare_model(m) if prepare else m.eval()


def make_tiny_swin(seed=0, prepare=True):
    from timm.models.swin_transformer import SwinTransformer
    import models
    torch.manual_seed(seed)
    m = SwinTransformer(img_size=32, patch_size=2, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=4,
                        num_classes=10, drop_path_rate=0.0)
    randomize_layernorms(m, seed)
    return models.prepare_model(m) if prepare else m.eval()


def make_tiny_resnet(seed=0, bottleneck=False, num_classes=10):
    """timm's ResNet with one block per stage (stride 2 from layer2 on; the stage inputs have 64, 64 or 256,
    128 or 512, 256 or 1024 channels: 1, 2 and 4 groups at factor 64), trained-like BatchNorms."""
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet
    from models.resnet import randomize_batchnorms
    torch.manual_seed(seed)
    m = ResNet(Bottleneck if bottleneck else BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    return randomize_batchnorms(m, seed).eval()


@pytest.fixture
def tiny_resnet():
    return make_tiny_resnet()


@pytest.fixture
def tiny_vit():
    return make_tiny_vit()


@pytest.fixture
def tiny_deit_distilled():
    return make_tiny_vit(distilled=True)


@pytest.fixture
def tiny_swin():
    return make_tiny_swin()


def save_random_checkpoint(timm_name, path, wrap=False):
    """A random-weight checkpoint of a real timm architecture (trained-like LayerNorms)."""
    import timm
    from models import randomize_layernorms
    torch.manual_seed(0)
    state = randomize_layernorms(timm.create_model(timm_name, pretrained=False)).state_dict()
    torch.save({'model': state} if wrap else state, path)
    return path


@contextlib.contextmanager
def gloo_group(rank, world_size, port, timeout_s=60):
    """A test worker's gloo process group on localhost, at one CPU thread (the reference runs at one too);
    a collective that some rank never joins fails after ``timeout_s`` instead of hanging the suite."""
    import datetime
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_ranks(fn, args, nprocs):
    """``fn(rank, *args)`` in ``nprocs`` processes forked from this one, as torch.multiprocessing.spawn runs it
    (an exception in a rank fails the call): a forked rank inherits this process's imports, where a spawned one
    spends 5 to 7 s of CPU importing torch and timm again. The suite runs at one CPU thread, so no OpenMP
    pool is forked half-alive."""
    import torch.multiprocessing as mp
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method='fork')


def side_by_side(commands, cwd, env, timeout=900):
    """Run ``python argv`` for each argv of ``commands`` at once (in ``cwd``, with ``env``); each must exit 0.
    Returns their standard outputs, in order."""
    procs = [subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv in commands]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    return [out for out, _ in outs]


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_script(script, *args, env=None):
    """Run an entry script as a user would, outside any launcher (``env`` adds variables); returns the
    CompletedProcess."""
    base = {k: v for k, v in os.environ.items()
            if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT,
                          env={**base, 'PYTHONWARNINGS': 'ignore', **(env or {})},
                          capture_output=True, text=True, timeout=600)


# Tiny timm models under timm names, so that whole runs of the pipeline take seconds: the pipeline
# builds them through timm.create_model like any other name (in this process only, and its loader
# workers). num_classes matches the folders of make_image_folder (3 classes).
from timm.models.registry import register_model  # noqa: E402

TINY_CLASSES = 3
default_cfgs = {name: {'url': '', 'num_classes': TINY_CLASSES, 'input_size': (3, 32, 32), 'crop_pct': 0.9,
                       'interpolation': 'bicubic', 'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225)}
                for name in ('vit_test_tiny', 'swin_test_tiny')}


@register_model
def vit_test_tiny(pretrained=False, **kwargs):
    from timm.models.vision_transformer import VisionTransformer
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3,
                              num_classes=TINY_CLASSES, **kwargs)
    model.default_cfg = default_cfgs['vit_test_tiny']
    return model


@register_model
def swin_test_tiny(pretrained=False, **kwargs):
    from timm.models.swin_transformer import SwinTransformer
    model = SwinTransformer(img_size=32, patch_size=2, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=4,
                            num_classes=TINY_CLASSES, **kwargs)
    model.default_cfg = default_cfgs['swin_test_tiny']
    return model
