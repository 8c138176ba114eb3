"""The whole run behind both entry scripts: RepQ-ViT, then QwT, then evaluation of both, for one
process or many. ViT/DeiT and Swin differ only in the model family they accept."""
import argparse
import json
import logging
import os
import random
import sys

import numpy as np
import torch
from tqdm import tqdm

from models import build_model, resolve_model
from quant import model_size_mb, qwt_compensate, repq_vit, set_compensation
from quant.regression import SOLVERS
from quant.qwt import ACCUMULATE
from utils import distributed
from utils.data import eval_loader, eval_transform, image_folder, train_loader, train_transform
from utils.evaluate import evaluate
from utils.timing import Stopwatch

_logger = logging.getLogger('qwt')
FAMILY_SCRIPTS = {'vit': 'qwt_vit_and_deit.py', 'swin': 'qwt_swin.py'}
EVAL_CHOICES = ('both', 'repq', 'qwt', 'none')


def build_parser(family):
    examples = {'vit': 'vit_small, vit_base, deit_tiny, deit_small, deit_base, deit_*_distilled',
                'swin': 'swin_tiny, swin_small'}[family]
    p = argparse.ArgumentParser(
        prog=FAMILY_SCRIPTS[family],
        description='RepQ-ViT post-training quantization, then QwT compensation, evaluated on ImageNet.')
    p.add_argument('--model', required=True, help=f'{examples}, or a full timm 0.4.12 name')
    p.add_argument('--data_dir', required=True, help='ImageNet root holding train/<class>/* and val/<class>/*')
    p.add_argument('--w_bit', '--w_bits', dest='w_bits', type=int, default=4, help='weight bits (default 4)')
    p.add_argument('--a_bit', '--a_bits', dest='a_bits', type=int, default=4, help='activation bits (default 4)')
    p.add_argument('--batch_size', type=int, default=32,
                   help='batch size of the calibration, QwT and val loaders (default 32; the calibration batch is one batch)')
    p.add_argument('--num_workers', type=int, default=8, help='data loading workers per process (default 8)')
    p.add_argument('--seed', type=int, default=0, help='seed of python, numpy and torch (default 0)')
    p.add_argument('--start_block', type=int, default=0,
                   help='first block that gets QwT compensation; earlier blocks get zeros (default 0)')
    p.add_argument('--qwt_samples', type=int, default=512,
                   help='training images for QwT over all processes (default 512)')
    p.add_argument('--checkpoint', default=None,
                   help='local weights (.pth state dict, or timm .npz for vit_*); nothing is downloaded')
    p.add_argument('--output_dir', default=None, help='where log.txt and result.json go (default output/<model>_w<W>a<A>)')
    p.add_argument('--device', default=None, help='cuda or cpu (default: cuda if available, else cpu)')
    p.add_argument('--local_rank', '--local-rank', dest='local_rank', type=int, default=None,
                   help='set by torch.distributed.launch; LOCAL_RANK from the environment wins')
    # Options beyond the published procedure (defaults are the published behaviour).
    p.add_argument('--qwt_solver', choices=SOLVERS, default='inverse',
                   help="QwT least squares: 'inverse' = published float32 inverse of [X,1]^T[X,1] (default); "
                        "'lstsq' = float64 least squares, better conditioned")
    p.add_argument('--qwt_accumulate', choices=ACCUMULATE, default='concat',
                   help="'concat' = the published concatenate-every-token-then-invert (default); 'normal' = normal "
                        "equations summed batch by batch on the device and all-reduced across processes: the same "
                        "fit to float tolerance, faster, less memory")
    p.add_argument('--calib_search', choices=('vectorized', 'per_channel'), default='vectorized',
                   help="quantizer initialisation: all channels at once (default) or the published one-channel-"
                        "at-a-time loop; both give identical parameters")
    p.add_argument('--eval', choices=EVAL_CHOICES, default='both',
                   help='which models to evaluate on val: both in one pass (default), one, or none')
    return p


def parse_args(family, argv=None):
    parser = build_parser(family)
    args = parser.parse_args(argv)
    try:
        spec = resolve_model(args.model)
    except ValueError as e:
        parser.error(str(e))
    if spec.family != family:
        parser.error(f"--model {args.model} is a {spec.family} model: run it with {FAMILY_SCRIPTS[spec.family]}")
    for flag in ('w_bits', 'a_bits'):
        if not 2 <= getattr(args, flag) <= 8:
            parser.error(f"--{flag} {getattr(args, flag)} not supported: use 2 to 8")
    for flag in ('batch_size', 'qwt_samples'):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.start_block < 0:
        parser.error(f"--start_block must be >= 0, got {args.start_block}")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint} not found: pass the path of a local .pth or .npz file")
    if not os.path.isdir(args.data_dir):
        parser.error(f"--data_dir {args.data_dir} is not a directory (expected DATA_DIR/train/<class>/* and DATA_DIR/val/<class>/*)")
    if args.output_dir is None:
        args.output_dir = os.path.join('output', f'{args.model}_w{args.w_bits}a{args.a_bits}')
    return args


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging(output_dir, is_main):
    _logger.handlers.clear()
    _logger.propagate = False
    level = logging.INFO if is_main else logging.WARNING
    fmt = logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S')
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, 'log.txt'), mode='w'))
    for h in handlers:
        h.setFormatter(fmt)
        for name in ('qwt', 'quant'):
            logging.getLogger(name).addHandler(h)
    for name in ('qwt', 'quant'):
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).propagate = False


def calibration_batch(dataset, args, dist_info):
    """The first batch of the shuffled training loader on rank 0, broadcast to every process."""
    loader = train_loader(dataset, args.batch_size, args.num_workers, args.seed, dist_info, epoch=0)
    if len(loader) == 0:
        raise ValueError(f"the training split has {len(dataset)} images, fewer than one batch of {args.batch_size}")
    images = next(iter(loader))[0].to(dist_info.device)
    return distributed.broadcast(images, src=0)


def qwt_images(dataset, args, dist_info):
    """This process's QwT images: qwt_samples // batch_size // world_size batches of a new pass."""
    n_batches = args.qwt_samples // args.batch_size // dist_info.world_size
    if n_batches < 1:
        raise ValueError(f"--qwt_samples {args.qwt_samples} gives no batch of {args.batch_size} per process with "
                         f"{dist_info.world_size} processes: raise it to at least {args.batch_size * dist_info.world_size}")
    loader = train_loader(dataset, args.batch_size, args.num_workers, args.seed, dist_info, epoch=1)
    if len(loader) < n_batches:
        raise ValueError(f"the training split gives {len(loader)} batches per process, fewer than the "
                         f"{n_batches} that --qwt_samples {args.qwt_samples} needs")
    batches = []
    for i, (images, _) in enumerate(tqdm(loader, total=n_batches, desc='QwT samples', disable=not dist_info.is_main,
                                         leave=False)):
        if i == n_batches:
            break
        batches.append(images.to(dist_info.device, non_blocking=True))
    return torch.cat(batches)


def run(args):
    """Run the pipeline for parsed ``args``; returns the result dict (written on rank 0)."""
    dist_info = distributed.init_distributed(args.device, args.local_rank)
    setup_logging(args.output_dir, dist_info.is_main)
    spec = resolve_model(args.model)
    seed_everything(args.seed + dist_info.rank)
    timer = Stopwatch(dist_info.device)
    _logger.info('%s (%s) W%d/A%d on %s x %d', args.model, spec.timm_name, args.w_bits, args.a_bits,
                 dist_info.device, dist_info.world_size)

    with timer('build'):
        model = build_model(args.model, pretrained=args.checkpoint is None, checkpoint=args.checkpoint)
        model.to(dist_info.device)
        cfg = model.default_cfg
        mean, std = spec.mean or cfg['mean'], spec.std or cfg['std']
        crop_pct = spec.crop_pct or cfg['crop_pct']
        train_set = image_folder(args.data_dir, 'train', train_transform(mean, std))
        val_set = image_folder(args.data_dir, 'val', eval_transform(mean, std, crop_pct))
    _logger.info('train %d images, val %d images, %d classes', len(train_set), len(val_set), len(val_set.classes))

    with timer('calibration_data'):
        calib = calibration_batch(train_set, args, dist_info)
    repq_times = {}
    with timer('repq'):
        repq_vit(model, calib, args.w_bits, args.a_bits, per_channel_loop=args.calib_search == 'per_channel',
                 timings=repq_times)
    _logger.info('RepQ-ViT calibration done in %.1f s', timer.seconds['repq'])

    with timer('qwt_data'):
        images = qwt_images(train_set, args, dist_info)
    qwt_stats, qwt_times = [], {}
    with timer('qwt'):
        qwt_compensate(model, images, start_block=args.start_block, batch_size=args.batch_size,
                       solver=args.qwt_solver, accumulate=args.qwt_accumulate, progress=dist_info.is_main,
                       stats=qwt_stats, timings=qwt_times)
    del images
    _logger.info('QwT compensation done in %.1f s (%d of %d blocks compensated)', timer.seconds['qwt'],
                 sum(s['used'] for s in qwt_stats), len(qwt_stats))

    def variant(enabled):
        def fn(x):
            set_compensation(model, enabled)
            return model(x)
        return fn
    wanted = {'both': ('repq', 'qwt'), 'repq': ('repq',), 'qwt': ('qwt',), 'none': ()}[args.eval]
    variants = {name: variant(name == 'qwt') for name in wanted}
    accuracy = {}
    if variants:
        with timer('eval'):
            loader = eval_loader(val_set, args.batch_size, args.num_workers, dist_info)
            accuracy = evaluate(variants, loader, dist_info.device, progress=dist_info.is_main)
    set_compensation(model, True)

    result = {
        'model': args.model, 'timm_name': spec.timm_name, 'w_bits': args.w_bits, 'a_bits': args.a_bits,
        'seed': args.seed, 'world_size': dist_info.world_size, 'device': str(dist_info.device),
        'num_val': len(val_set), 'num_calib': int(calib.shape[0]),
        'num_qwt': (args.qwt_samples // args.batch_size // dist_info.world_size) * args.batch_size * dist_info.world_size,
        'start_block': args.start_block, 'qwt_solver': args.qwt_solver, 'qwt_accumulate': args.qwt_accumulate,
        'calib_search': args.calib_search,
        'repq_top1': accuracy.get('repq', {}).get('top1'), 'repq_top5': accuracy.get('repq', {}).get('top5'),
        'qwt_top1': accuracy.get('qwt', {}).get('top1'), 'qwt_top5': accuracy.get('qwt', {}).get('top5'),
        'repq_size_mb': round(model_size_mb(model, include_compensation=False), 4),
        'qwt_size_mb': round(model_size_mb(model, include_compensation=True), 4),
        'qwt_blocks': qwt_stats,
        'timings': {**timer.rounded(), **{f'repq_{k}': round(v, 3) for k, v in repq_times.items()},
                    **{f'qwt_{k}': round(v, 3) for k, v in qwt_times.items()}},
        'versions': versions(),
    }
    if dist_info.is_main:
        with open(os.path.join(args.output_dir, 'result.json'), 'w') as f:
            json.dump(result, f, indent=2)
        for line in summary_lines(result):
            _logger.info(line)
    distributed.barrier()
    return result


def versions():
    import timm
    import torchvision
    return {'python': sys.version.split()[0], 'torch': torch.__version__, 'torchvision': torchvision.__version__,
            'timm': timm.__version__, 'numpy': np.__version__}


def _pct(v):
    return 'n/a' if v is None else f'{v:.2f}'


def summary_lines(r):
    return [
        f"== {r['model']} W{r['w_bits']}/A{r['a_bits']}, {r['num_val']} val images, {r['world_size']} process(es) ==",
        f"RepQ-ViT       top-1 {_pct(r['repq_top1'])}  top-5 {_pct(r['repq_top5'])}  size {r['repq_size_mb']:.2f} MB",
        f"RepQ-ViT + QwT top-1 {_pct(r['qwt_top1'])}  top-5 {_pct(r['qwt_top5'])}  size {r['qwt_size_mb']:.2f} MB",
        'timings (s): ' + ', '.join(f'{k} {v}' for k, v in r['timings'].items()),
    ]


def main(family, argv=None):
    """Entry point of both scripts: parse, run, clean up; user errors exit 2 with one line."""
    args = parse_args(family, argv)
    try:
        return run(args)
    except (OSError, ValueError) as e:  # bad data folder, checkpoint, weights or sizes: one line, no traceback
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.cleanup()
