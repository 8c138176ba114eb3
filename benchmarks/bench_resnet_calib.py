"""Time the Percentile calibration of a random-weight ResNet with the vectorised quantizer search against
the published one-channel-at-a-time loop, in one run on the same weights and images, check that both give
identical quantizer parameters, and time the group-convolution QwT fit (nothing is downloaded).

    python benchmarks/bench_resnet_calib.py [--model resnet50] [--calib_images 32] [--qwt_images 32]
"""
import argparse
import copy
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_pipeline import print_stage_table  # noqa: E402
from models import build_model, randomize_batchnorms  # noqa: E402
from quant import percentile_ptq, qwt_compensate  # noqa: E402
from quant.layers import quantizers  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def different_quantizers(a, b):
    """Names of the quantizers whose scale or zero point differ between two calibrated models."""
    qb = dict(quantizers(b))
    return [name for name, q in quantizers(a)
            if not (torch.equal(q.delta, qb[name].delta) and torch.equal(q.zero_point, qb[name].zero_point))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='resnet50', choices=('resnet18', 'resnet50', 'resnet101'))
    p.add_argument('--calib_images', type=int, default=32, help='calibration images (published: 32)')
    p.add_argument('--qwt_images', type=int, default=32, help='QwT images (published: 512)')
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--size', type=int, default=224, help='image side in pixels')
    p.add_argument('--w_bits', type=int, default=4)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = randomize_batchnorms(build_model(args.model, pretrained=False))
    gen = torch.Generator().manual_seed(1)
    calib = torch.randn(args.calib_images, 3, args.size, args.size, generator=gen)
    qwt_images = torch.randn(args.qwt_images, 3, args.size, args.size, generator=gen)
    published = copy.deepcopy(model)
    t_fast, fast = timed(lambda: percentile_ptq(model, calib, args.w_bits, 4))
    t_loop, _ = timed(lambda: percentile_ptq(published, calib, args.w_bits, 4, per_channel_loop=True))
    differ = different_quantizers(fast, published)
    n_quantizers = len(quantizers(fast))
    timings = {}
    t_qwt, _ = timed(lambda: qwt_compensate(fast, qwt_images, batch_size=args.batch_size, timings=timings))
    rows = [('calibration, vectorised search', t_fast),
            ('calibration, published per-channel loop', t_loop),
            ('ratio (published / vectorised)', t_loop / t_fast),
            (f'QwT fit, {args.qwt_images} images, total', t_qwt),
            ('  of which block passes', timings.get('passes', 0.0)),
            ('  of which ridge fits', timings.get('fit', 0.0))]
    print(f'# {args.model} W{args.w_bits} (random weights), {args.calib_images} calibration images of '
          f'{args.size}x{args.size}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), '
          f'{platform.processor() or platform.machine()}')
    print_stage_table(rows)
    print(f'identical parameters: {n_quantizers - len(differ)} of {n_quantizers} quantizers')
    if differ:
        raise SystemExit(f'error: the vectorised search differs from the published loop in {", ".join(differ[:3])}')
    return rows


if __name__ == '__main__':
    main()
