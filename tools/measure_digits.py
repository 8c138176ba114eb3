"""What RepQ-ViT and RepQ-ViT + QwT do to the two digits models of ``models/digits``, on real images.

    OMP_NUM_THREADS=1 python tools/measure_digits.py                       # both models, W3/A3 W4/A4 W6/A6, seeds 0 1 2
    OMP_NUM_THREADS=1 python tools/measure_digits.py --models swin_digits --bits 3 --seeds 0 --solvers inverse lstsq

Per model, bits and seed, through the library API on the image folder that ``write_image_folder``
makes: seed python / numpy / torch; the first batch of the shuffled training loader (training-split
transform: RandomResizedCrop, flip, RandAugment rand-m9-mstd0.5-inc1) is the calibration batch (32
images); ``timm.create_model(name, pretrained=True)`` + ``models.prepare_model``; RepQ-ViT; a new pass
of the loader gives the QwT images (256); QwT with each solver (published defaults otherwise:
'concat', start_block 0); evaluation of the 500 held-out digits (evaluation transform). Reports top-1
of the full-precision, RepQ-ViT and RepQ-ViT + QwT models and the mean squared error of their logits
to the full-precision logits (mean over images and classes), and each block's QwT r².
"""
import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.core.cpu_numerics import pin_cpu_numerics  # noqa: E402

# As the demo: the same figures on every x86-64 CPU (utils.core.cpu_numerics), pinned before torch loads; a
# no-op where torch is already imported (the tests import this module: they run it as a script to pin it).
PINNED = pin_cpu_numerics()

from utils.run.cli import quiet_known_warnings  # noqa: E402  (imports no torch)

quiet_known_warnings()  # timm 0.4.12's, before it is imported (the scripts' own filter)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402
import quant  # noqa: E402
from models import digits  # noqa: E402
from models.registry import data_config, resolve_model  # noqa: E402
from utils.run.data import eval_transform, image_dataset, train_transform  # noqa: E402


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def datasets(data_dir, name):
    """(train with the training-split transform, val with the evaluation transform) of ``name``'s data config."""
    cfg = data_config(resolve_model(name))
    train = image_dataset(data_dir, 'train', train_transform(cfg['mean'], cfg['std'], cfg['interpolation'],
                                                             cfg['img_size']))
    val = image_dataset(data_dir, 'val', eval_transform(cfg['mean'], cfg['std'], cfg['crop_pct'],
                                                        cfg['interpolation'], cfg['img_size']))
    return train, val


def stack_val(val):
    """All held-out images [500, 3, 32, 32] and labels, in file order."""
    items = [val[i] for i in range(len(val))]
    return torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items])


def draw_images(train, seed, calib=32, qwt=256, batch=32):
    """(calibration batch, QwT images): the first batch of a shuffled loader, then ``qwt`` images from a
    new pass of it, drawn after seeding with ``seed`` (one process, no loader workers)."""
    seed_all(seed)
    loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, num_workers=0, drop_last=True)
    calib_images = next(iter(loader))[0][:calib]
    chunks = []
    for images, *_ in loader:
        chunks.append(images)
        if sum(len(c) for c in chunks) >= qwt:
            break
    return calib_images, torch.cat(chunks)[:qwt]


@torch.no_grad()
def logits_of(model, x, batch=250):
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def top1(logits, y):
    return 100.0 * float((logits.argmax(1) == y).float().mean())


def mse(a, b):
    return float((a - b).pow(2).mean())


def trained_model(name):
    import timm
    return models.prepare_model(timm.create_model(name, pretrained=True, drop_path_rate=0.0))


def measure(name, w_bits, a_bits, seed, train, x_val, y_val, solvers=('inverse',), calib=32, qwt=256, fp=None):
    """One run: dict with fp / repq / qwt top-1, logit MSE to FP, and per-solver QwT results and r². ``fp``:
    the full-precision logits of ``x_val`` if already computed (the same for every run of ``name``)."""
    calib_images, qwt_images = draw_images(train, seed, calib, qwt)
    model = trained_model(name)
    if fp is None:
        fp = logits_of(model, x_val)
    t = time.time()
    quant.repq_vit(model, calib_images, w_bits, a_bits)
    repq = logits_of(model, x_val)
    out = {'model': name, 'w_bits': w_bits, 'a_bits': a_bits, 'seed': seed, 'fp': top1(fp, y_val),
           'repq': top1(repq, y_val), 'mse_repq': mse(repq, fp), 'seconds_repq': time.time() - t, 'qwt': {}}
    for solver in solvers:
        q = copy.deepcopy(model)
        stats = []
        t = time.time()
        quant.qwt_compensate(q, qwt_images, solver=solver, stats=stats)
        comp = logits_of(q, x_val)
        out['qwt'][solver] = {'top1': top1(comp, y_val), 'mse': mse(comp, fp), 'seconds': time.time() - t,
                              'r2': [s['r2'] for s in stats], 'used': [s['used'] for s in stats]}
    return out


def summarise(rows, solver):
    by = {}
    for r in rows:
        by.setdefault((r['model'], r['w_bits'], r['a_bits']), []).append(r)
    lines = []
    for (name, w, a), rs in by.items():
        rq = np.array([r['repq'] for r in rs])
        qw = np.array([r['qwt'][solver]['top1'] for r in rs])
        m0 = np.array([r['mse_repq'] for r in rs])
        m1 = np.array([r['qwt'][solver]['mse'] for r in rs])
        r2 = np.array([[np.nan if v is None else v for v in r['qwt'][solver]['r2']] for r in rs])
        lines.append(f"{name} W{w}/A{a} [{solver}] seeds {[r['seed'] for r in rs]}: FP {rs[0]['fp']:.1f} | "
                     f"RepQ {rq.mean():.2f}±{rq.std(ddof=1) if len(rs) > 1 else 0:.2f} {rq.round(1).tolist()} | "
                     f"QwT {qw.mean():.2f}±{qw.std(ddof=1) if len(rs) > 1 else 0:.2f} {qw.round(1).tolist()} | "
                     f"gain {qw.mean() - rq.mean():+.2f} | logit MSE {m0.mean():.4f} -> {m1.mean():.4f} "
                     f"({100 * (1 - m1.mean() / m0.mean()):.0f} % lower) per seed {m0.round(4).tolist()} -> "
                     f"{m1.round(4).tolist()} | r2 mean per block {np.round(r2.mean(0), 3).tolist()}")
    return lines


def _pm(values):
    v = np.array(values)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0:.2f}"


def _signed(x, fmt):
    """``x`` with a sign, the minus as in the README (U+2212)."""
    text = format(abs(x), fmt)
    return ('+' if x >= 0 or float(text) == 0 else '\u2212') + text  # no -0.00


def table_row(rs, solver='inverse', bold=False):
    """models/digits/README.md's row of one model and bit width (``rs``: its runs, one per seed)."""
    r0 = rs[0]
    rq = [r['repq'] for r in rs]
    qw = [r['qwt'][solver]['top1'] for r in rs]
    m0, m1 = np.mean([r['mse_repq'] for r in rs]), np.mean([r['qwt'][solver]['mse'] for r in rs])
    b = (lambda t: f'**{t}**') if bold else (lambda t: t)
    per_seed = lambda vs: ' '.join(f'{v:.1f}' for v in vs)  # noqa: E731
    change = _signed(100 * (m1 / m0 - 1), '.0f') + ' %'
    bits = f"W{r0['w_bits']}/A{r0['a_bits']}"
    return (f"| {r0['model']} | {b(bits)} | {r0['fp']:.1f} | {_pm(rq)} [{per_seed(rq)}] | "
            f"{_pm(qw)} [{per_seed(qw)}] | {b(_signed(np.mean(qw) - np.mean(rq), '.2f'))} | "
            f"{m0:#.3g} \u2192 {m1:#.3g} ({b(change)}) |")


def seeds_sentence(vit, swin, w6, solver='inverse'):
    """The README's sentence on seeds 0, 1, 2: ``vit`` and ``swin`` the runs at their demo bits, ``w6`` every
    model's runs at W6/A6."""
    def part(label, rs):
        rq, qw = [r['repq'] for r in rs], [r['qwt'][solver]['top1'] for r in rs]
        m0, m1 = np.mean([r['mse_repq'] for r in rs]), np.mean([r['qwt'][solver]['mse'] for r in rs])
        return (f"{label} W{rs[0]['w_bits']}/A{rs[0]['a_bits']} {_pm(rq)} \u2192 {_pm(qw)}", f'{m0:.3f} \u2192 {m1:.3f}')
    (v, vm), (s, sm) = part('ViT', vit), part('Swin', swin)
    most = max(abs(r['qwt'][solver]['top1'] - r['repq']) for r in w6)
    return (f"Over seeds 0, 1, 2 (library API, one thread, the demo's pinned CPU kernels; `tests/test_digits.py` "
            f"holds these): {v}, mean squared logit error to FP {vm}; {s}, {sm}. At W6/A6 QwT changes top-1 by at "
            f"most {most:.1f} points on any seed (`models/digits/README.md` has the full table).")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--models', nargs='+', default=list(digits.ARCHS), choices=list(digits.ARCHS))
    p.add_argument('--bits', nargs='+', default=['3', '4', '6'],
                   help="bit widths: N for WN/AN, or W/A (e.g. 3/4 for W3/A4); default 3 4 6")
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--solvers', nargs='+', default=['inverse', 'lstsq'], choices=['inverse', 'lstsq'])
    p.add_argument('--weights', default=None, help='folder with vit_digits.pth / swin_digits.pth to use instead '
                                                   'of the committed ones')
    p.add_argument('--json', default=None, help='write every run as JSON here')
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.weights:
        digits.WEIGHTS.update({n: os.path.join(args.weights, f'{n}.pth') for n in digits.ARCHS})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        digits.write_image_folder(tmp)
        for name in args.models:
            train, val = datasets(tmp, name)
            x_val, y_val = stack_val(val)
            fp = logits_of(trained_model(name), x_val)  # once per model: every run starts from the same weights
            for bits in args.bits:
                w_bits, a_bits = (int(b) for b in (bits.split('/') if '/' in bits else (bits, bits)))
                for seed in args.seeds:
                    r = measure(name, w_bits, a_bits, seed, train, x_val, y_val, args.solvers, fp=fp)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    for solver in args.solvers:
        print('\n'.join(summarise(rows, solver)))
        groups = {}
        for r in rows:
            groups.setdefault((r['model'], r['w_bits'], r['a_bits']), []).append(r)
        print(f'models/digits/README.md rows ({solver}; bold the demo bits by hand):')
        print('\n'.join(table_row(rs, solver) for rs in groups.values()))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
