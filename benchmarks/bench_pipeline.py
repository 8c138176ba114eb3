"""Time the pipeline's stages on a random-weight model and synthetic images (nothing is downloaded).

    python benchmarks/bench_pipeline.py --model deit_small [--device cpu|cuda] [--compare-naive]

Prints seconds for RepQ-ViT calibration, reparameterisation and re-calibration, QwT fitting,
evaluation images/s (RepQ-ViT and RepQ-ViT + QwT on each batch) and peak memory. With
--compare-naive it also runs, in the same process on the same weights and images, the published
one-channel-at-a-time quantizer search and the published concatenate-then-invert QwT fit, checks
that they give the same quantizer parameters / compensation, and prints the speed ratios.
"""
import argparse
import copy
import os
import platform
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.run.cli import quiet_known_warnings  # noqa: E402

quiet_known_warnings()  # timm 0.4.12's, before it is imported (the scripts' own filter)
from models import build_model, randomize_layernorms  # noqa: E402
from quant import qwt_compensate, repq_vit, set_compensation  # noqa: E402
from quant.layers import quantizers  # noqa: E402
from utils.core.allocator import keep_freed_memory  # noqa: E402


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(device, fn):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def random_model(name, device, seed):
    """timm's random initialisation with trained-like LayerNorms."""
    torch.manual_seed(seed)
    return randomize_layernorms(build_model(name, pretrained=False)).to(device)


def peak_memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def same_quantizers(a, b):
    """Names of quantizers whose parameters differ between two calibrated models (empty: identical)."""
    diff = []
    for (name, qa), (_, qb) in zip(quantizers(a), quantizers(b)):
        for attr in ('delta', 'zero_point'):
            va, vb = getattr(qa, attr, None), getattr(qb, attr, None)
            if (va is None) != (vb is None) or (va is not None and not torch.equal(va, vb)):
                diff.append(f'{name}.{attr}')
    return diff


def same_features_gap(q_model, images, batch_size):
    """Relative max difference of (W, b) fitted both ways on the same features: the first block's
    input X0 and error Y, which the two paths compute identically."""
    from models import stem, walk
    from quant.layers import set_quant_state
    from quant.regression import NormalEquations, fit_concat, solve_normal
    block = walk(q_model)[0].module
    with torch.no_grad():
        set_quant_state(q_model, True, True)
        xs = [stem(q_model, c) for c in images.split(batch_size)]
        ys = []
        for x in xs:
            set_quant_state(block, False, False)
            fp = block(x)
            set_quant_state(block, True, True)
            ys.append(fp - block(x))
        c_in, c_out = xs[0].shape[-1], ys[0].shape[-1]
        neq = NormalEquations(c_in, c_out, xs[0].device)
        for x, y in zip(xs, ys):
            neq.add(x.reshape(-1, c_in), y.reshape(-1, c_out))
        w_n, b_n = solve_normal(neq.gram, neq.rhs)
        w_c, b_c = fit_concat(torch.cat(xs).reshape(-1, c_in), torch.cat(ys).reshape(-1, c_out))
    return max(((w_n - w_c).abs().max() / w_c.abs().max()).item(), ((b_n - b_c).abs().max() / b_c.abs().max()).item())


def quantized_forward_seconds(model, x, device):
    """One forward pass of the calibrated model: the part of 'calibration' that is not quantizer init."""
    with torch.no_grad():
        return timed(device, lambda: model(x))[0]


def published_calibration(fp_model, model, calib, args, device, t_repq, fwd_fast, rows):
    """With --compare-naive: time the published calibration on a copy of ``fp_model``, add its rows,
    and return the comparison with this project's calibrated ``model`` (empty dict otherwise)."""
    if not args.compare_naive:
        return {}
    ref = copy.deepcopy(fp_model)
    t_ref = {}
    timed(device, lambda: repq_vit(ref, calib, args.w_bits, args.a_bits, per_channel_loop=True, timings=t_ref))
    fwd_ref = quantized_forward_seconds(ref, calib, device)
    rows += [('published calibration (one channel at a time)', t_ref['calibrate']),
             ('published re-calibration (2nd forward)', t_ref['recalibrate'])]
    return {'calibration': (t_ref['calibrate'], t_repq['calibrate'], same_quantizers(model, ref)),
            'init': (t_ref['calibrate'] - fwd_ref, t_repq['calibrate'] - fwd_fast),
            'recal': (t_ref['recalibrate'], t_repq['recalibrate'])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', required=True, help='table name (deit_small, vit_base, swin_tiny, ...) or timm name')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda')
    p.add_argument('--w_bits', type=int, default=4)
    p.add_argument('--a_bits', type=int, default=4)
    p.add_argument('--calib_images', type=int, default=32, help='calibration batch size (published: 32)')
    p.add_argument('--qwt_images', type=int, default=512, help='QwT images (published: 512)')
    p.add_argument('--eval_images', type=int, default=64, help='synthetic images for the evaluation rate')
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--compare-naive', dest='compare_naive', action='store_true',
                   help='also time the published per-channel search and concatenate-then-invert QwT')
    p.add_argument('--calibration-only', dest='calibration_only', action='store_true',
                   help='time RepQ-ViT calibration only (no QwT, no evaluation)')
    p.add_argument('--system-malloc', dest='system_malloc', action='store_true',
                   help="CPU: keep glibc's allocator defaults (the pipeline keeps freed memory, utils/core/allocator.py)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == 'cpu' and not args.system_malloc:
        keep_freed_memory()
    gen = torch.Generator().manual_seed(args.seed)
    calib = torch.randn(args.calib_images, 3, 224, 224, generator=gen).to(device)
    qwt_imgs = torch.randn(args.qwt_images, 3, 224, 224, generator=gen).to(device)
    eval_imgs = torch.randn(args.eval_images, 3, 224, 224, generator=gen).to(device)

    fp_model = random_model(args.model, device, args.seed)
    rows = []
    model = copy.deepcopy(fp_model)
    with torch.no_grad():  # the floor of calibration: its forward pass without any quantization
        rows.append(('full-precision forward of the calibration batch', timed(device, lambda: fp_model(calib))[0]))
    t_repq = {}
    total, _ = timed(device, lambda: repq_vit(model, calib, args.w_bits, args.a_bits, timings=t_repq))
    rows += [('calibration (1st forward + quantizer init)', t_repq['calibrate']),
             ('reparameterisation', t_repq['reparameterize']),
             ('re-calibration (step 3: weight quantizers only)', t_repq['recalibrate'])]
    fwd_fast = quantized_forward_seconds(model, calib, device)
    rows.append(('  quantizer initialisation (calibration minus a calibrated forward)', t_repq['calibrate'] - fwd_fast))
    if args.calibration_only:
        naive = published_calibration(fp_model, model, calib, args, device, t_repq, fwd_fast, rows)
        report(args, device, rows, naive)
        return rows, naive
    quantized = copy.deepcopy(model) if args.compare_naive else None
    qwt_t, qwt_stats = {}, []
    t_qwt, _ = timed(device, lambda: qwt_compensate(model, qwt_imgs, batch_size=args.batch_size, accumulate='normal',
                                                   timings=qwt_t,
                                                   stats=qwt_stats))
    rows += [(f'QwT, {args.qwt_images} images (normal equations), total', t_qwt),
             ('  of which block passes', qwt_t['passes']), ('  of which least-squares fit', qwt_t['fit'])]

    def eval_pass():
        with torch.no_grad():
            for x in eval_imgs.split(args.batch_size):
                set_compensation(model, False)
                model(x)
                set_compensation(model, True)
                model(x)
    t_eval, _ = timed(device, eval_pass)
    rows.append(('eval, both models per batch (s)', t_eval))

    naive = published_calibration(fp_model, model, calib, args, device, t_repq, fwd_fast, rows)
    if args.compare_naive:
        same_gap = same_features_gap(quantized, qwt_imgs, args.batch_size)
        concat_t, concat_stats = {}, []
        t_concat, _ = timed(device, lambda: qwt_compensate(quantized, qwt_imgs, batch_size=args.batch_size,
                                                          accumulate='concat', timings=concat_t, stats=concat_stats))
        r2_gap = max(abs(a['r2'] - b['r2']) for a, b in zip(qwt_stats, concat_stats))
        naive['qwt'] = (t_concat, t_qwt, same_gap, r2_gap)
        naive['fit'] = (concat_t['fit'], qwt_t['fit'])
        with torch.no_grad():
            x = eval_imgs[:args.batch_size]
            a, b = model(x), quantized(x)
        naive['logits'] = ((a - b).abs().max().item() / a.abs().max().item(),
                           (a.argmax(1) == b.argmax(1)).float().mean().item())
        rows += [('published QwT (concatenate then invert), total', t_concat),
                 ('  of which block passes', concat_t['passes']), ('  of which least-squares fit', concat_t['fit'])]

    rows.append(('eval rate, both models per batch (images/s)', args.eval_images / t_eval))
    report(args, device, rows, naive)
    return rows, naive


def print_stage_table(rows):
    """(label, seconds) rows as a Markdown table (the benchmarks' shared output)."""
    print('| stage | seconds |\n|---|---|')
    for label, sec in rows:
        print(f'| {label} | {sec:.2f} |')


def report(args, device, rows, naive):
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()
    print(f'# {args.model} W{args.w_bits}/A{args.a_bits} on {device} ({name}, {torch.get_num_threads()} threads), '
          f'torch {torch.__version__}')
    print_stage_table(rows)
    print(f'| peak memory | {peak_memory_mb(device):.0f} MB |')
    if naive:
        slow, fast, diff = naive['calibration']
        print(f'calibration speed-up: {slow / fast:.1f}x ({slow:.2f} s -> {fast:.2f} s); '
              f'quantizer parameters {"identical" if not diff else "DIFFER: " + ", ".join(diff[:5])}')
        slow, fast = naive['init']
        print(f'quantizer initialisation speed-up: {slow / fast:.1f}x ({slow:.2f} s -> {fast:.2f} s)')
        slow, fast = naive['recal']
        print(f'calibration + re-calibration speed-up: {(naive["calibration"][0] + slow) / (naive["calibration"][1] + fast):.1f}x')
    if 'qwt' in naive:
        slow, fast = naive['fit']
        print(f'QwT least-squares fit speed-up: {slow / fast:.1f}x ({slow:.2f} s -> {fast:.2f} s)')
        slow, fast, gap, r2_gap = naive['qwt']
        print(f'QwT total speed-up: {slow / fast:.1f}x ({slow:.2f} s -> {fast:.2f} s)')
        print(f'same compensation: on the same features (block 0) W, b differ by {gap:.2e} (relative max); '
              f'r2 of every block within {r2_gap:.1e}')
        rel, agree = naive['logits']
        print(f'final logits, normal equations vs published (features drift through fake-quantization rounding '
              f'from block to block): max relative difference {rel:.2e}, top-1 agreement {100 * agree:.1f}%')


if __name__ == '__main__':
    main()
