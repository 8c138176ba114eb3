"""The whole run behind both entry scripts: RepQ-ViT, then QwT, then evaluation of both, for one
process or many. ViT/DeiT and Swin differ only in the model family they accept."""
import argparse
import json
import logging
import os
import random
import sys
import tempfile

import numpy as np
import torch
from tqdm import tqdm

from models import MODELS, build_model, pretrained_cached, randomize_layernorms, resolve_model
from quant import model_size_mb, qwt_compensate, repq_vit, set_compensation
from quant.qwt import ACCUMULATE, compensated_blocks
from quant.regression import SOLVERS
from quant.saved_model import load_quantized, read_saved, save_quantized
from utils import distributed, table
from utils.allocator import keep_freed_memory
from utils.data import eval_loader, eval_transform, image_folder, train_loader, train_transform, val_subset
from utils.demo import DEMO_DEFAULTS, make_demo_data
from utils.errors import UserError, one_line
from utils.evaluate import evaluate
from utils.files import write_text_atomic
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
    p.add_argument('--model', default=None, help=f'{examples}, or a full timm 0.4.12 name')
    p.add_argument('--data_dir', default=None, help='ImageNet root holding train/<class>/* and val/<class>/*')
    p.add_argument('--w_bit', '--w_bits', dest='w_bits', type=int, default=None, help='weight bits, 2 to 8 (default 4)')
    p.add_argument('--a_bit', '--a_bits', dest='a_bits', type=int, default=None, help='activation bits, 2 to 8 (default 4)')
    p.add_argument('--batch_size', type=int, default=32,
                   help='batch size of the calibration, QwT and val loaders (default 32; the calibration batch is one batch)')
    p.add_argument('--num_workers', type=int, default=8, help='data loading workers per process (default 8)')
    p.add_argument('--seed', type=int, default=0, help='seed of python, numpy and torch (default 0)')
    p.add_argument('--start_block', type=int, default=0,
                   help='first block that gets QwT compensation; earlier blocks get zeros (default 0)')
    p.add_argument('--qwt_samples', type=int, default=512,
                   help='training images for QwT over all processes, a multiple of batch_size x processes (default 512)')
    p.add_argument('--checkpoint', default=None,
                   help='local weights (.pth state dict, or timm .npz for vit_*); nothing is downloaded')
    p.add_argument('--trust_checkpoint', action='store_true',
                   help='let --checkpoint / --load files unpickle Python objects other than tensors (this can '
                        'run code from the file: only for files you trust)')
    p.add_argument('--output_dir', default=None, help='where log.txt and result.json go (default output/<model>_w<W>a<A>)')
    p.add_argument('--device', default=None, help='cuda or cpu (default: cuda if available, else cpu)')
    p.add_argument('--local_rank', '--local-rank', dest='local_rank', type=int, default=None,
                   help='set by torch.distributed.launch; LOCAL_RANK from the environment wins')
    p.add_argument('--save', default=None, metavar='PATH',
                   help='write the quantized and compensated model here as soon as it is fitted (atomic)')
    p.add_argument('--load', default=None, metavar='PATH',
                   help='evaluate a model written by --save: no calibration, no QwT, no train/ split needed')
    p.add_argument('--num_val', type=int, default=None, metavar='N',
                   help='evaluate on a fixed subset of N val images (the same for every run), for quick checks')
    p.add_argument('--demo', action='store_true',
                   help='run everything on a small generated image folder and a random-weight (or cached '
                        'pretrained) model: no data set, no download; finishes in about a minute on a CPU')
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
    """Parsed, checked flags. Every problem visible without touching data or weights is a one-line
    usage error (exit 2) here."""
    parser = build_parser(family)
    if parser.parse_known_args(argv)[0].demo:
        parser.set_defaults(**DEMO_DEFAULTS[family])
    args = parser.parse_args(argv)
    if args.model is None and args.load is None:
        parser.error(f"--model is required ({', '.join(n for n, s in MODELS.items() if s.family == family)}), "
                     "unless --load PATH or --demo")
    if args.data_dir is None and not args.demo:
        parser.error("--data_dir is required (ImageNet root with train/ and val/), unless --demo")
    if args.model is not None:
        try:
            spec = resolve_model(args.model)
        except UserError as e:
            parser.error(str(e))
        if spec.family != family:
            parser.error(f"--model {args.model} is a {spec.family} model: run it with {FAMILY_SCRIPTS[spec.family]}")
    for flag in ('w_bits', 'a_bits'):
        value = getattr(args, flag)
        if value is not None and not 2 <= value <= 8:
            parser.error(f"--{flag} {value} not supported: use 2 to 8")
    for flag in ('batch_size', 'qwt_samples', 'num_val'):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be positive, got {value}")
    if args.num_workers < 0:
        parser.error(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.start_block < 0:
        parser.error(f"--start_block must be >= 0, got {args.start_block}")
    if not 0 <= args.seed < 2 ** 32:
        parser.error(f"--seed {args.seed} is outside 0..2^32-1 (numpy's range)")
    if args.output_dir is not None and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output_dir {args.output_dir} is a file, not a folder: choose another path")
    if args.save is not None:
        problem = unwritable(args.save)
        if problem:
            parser.error(f"--save {args.save}: {problem}; choose another path (checked now, so that no "
                         "calibration is lost)")
    try:
        world = distributed.env_int('WORLD_SIZE', 1)
    except UserError as e:
        parser.error(str(e))
    step = args.batch_size * world  # SPEC §3: qwt_samples // batch // world_size batches per process
    if args.load is None and args.qwt_samples % step:
        below, above = args.qwt_samples // step * step, (args.qwt_samples // step + 1) * step
        parser.error(f"--qwt_samples {args.qwt_samples} is not a multiple of --batch_size {args.batch_size} x "
                     f"{world} process(es) = {step}: use {f'{below} or ' if below else ''}{above}")
    if args.load is not None:
        for flag in ('checkpoint', 'save'):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag} and --load exclude each other: --load evaluates a model already quantized")
        if not os.path.isfile(args.load):
            parser.error(f"--load {args.load} not found: pass a file written by --save")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint} not found: pass the path of a local .pth or .npz file")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        parser.error(f"--data_dir {args.data_dir} is not a directory (expected DATA_DIR/train/<class>/* and DATA_DIR/val/<class>/*)")
    if args.load is None:  # with --load the file has the bits; flags given must agree with it
        args.w_bits, args.a_bits = args.w_bits or 4, args.a_bits or 4
        if args.output_dir is None:
            name = f"{'demo_' if args.demo else ''}{args.model}_w{args.w_bits}a{args.a_bits}"
            args.output_dir = os.path.join('output', name)
    return args


def unwritable(path):
    """Why a file cannot be written at ``path`` (None if it can): a folder there, or the nearest
    existing parent folder not writable."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return 'is a directory'
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        return f'{parent} is not a writable folder'
    return None


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging(output_dir, is_main):
    """Console on every process (warnings only off rank 0); rank 0 also appends to OUTPUT_DIR/log.txt,
    so the log of an earlier run in the same folder is kept."""
    level = logging.INFO if is_main else logging.WARNING
    fmt = logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S')
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, 'log.txt'), mode='a'))
    teardown_logging()
    for name in ('qwt', 'quant'):
        log = logging.getLogger(name)
        for h in handlers:
            h.setFormatter(fmt)
            log.addHandler(h)
        log.setLevel(level)
        log.propagate = False


def teardown_logging():
    """Close the log file and give the loggers back their default state (the entry point may run
    in-process, e.g. under pytest)."""
    for name in ('qwt', 'quant'):
        log = logging.getLogger(name)
        for h in list(log.handlers):
            log.removeHandler(h)
            h.close()
        log.setLevel(logging.NOTSET)
        log.propagate = True


def log_to_file(message):
    """Append ``message`` to log.txt only (it is already on the console), if the log is open."""
    for h in _logger.handlers:
        if isinstance(h, logging.FileHandler):
            h.emit(_logger.makeRecord(_logger.name, logging.ERROR, __file__, 0, message, None, None))


def calibration_batch(dataset, args, dist_info):
    """The first batch of the shuffled training loader on rank 0, broadcast to every process."""
    loader = train_loader(dataset, args.batch_size, args.num_workers, args.seed, dist_info, epoch=0)
    images = next(iter(loader))[0].to(dist_info.device)
    return distributed.broadcast(images, src=0)


def qwt_images(dataset, args, dist_info):
    """This process's QwT images: qwt_samples // batch_size // world_size batches of a new pass."""
    n_batches = args.qwt_samples // args.batch_size // dist_info.world_size
    loader = train_loader(dataset, args.batch_size, args.num_workers, args.seed, dist_info, epoch=1)
    batches = []
    for i, (images, _) in enumerate(tqdm(loader, total=n_batches, desc='QwT samples', disable=not dist_info.is_main,
                                         leave=False)):
        if i == n_batches:
            break
        batches.append(images.to(dist_info.device, non_blocking=True))
    return torch.cat(batches)


def check_train_size(train_set, args):
    """The calibration batch plus the QwT images must exist (SPEC §1, §3: 32 + 512 by default)."""
    need = args.batch_size + args.qwt_samples
    if len(train_set) < need:
        raise UserError(f"{train_set.root} has {len(train_set)} images, fewer than the calibration batch "
                        f"(--batch_size {args.batch_size}) plus --qwt_samples {args.qwt_samples} = {need}: "
                        "add images or lower those flags")


def resolve_run_model(args, family, payload):
    """(ModelSpec, w_bits, a_bits) of this run: from the flags, or from the --load file, which must
    agree with any flag given."""
    if payload is None:
        return resolve_model(args.model), args.w_bits, args.a_bits
    spec = resolve_model(payload['timm_name'])
    if spec.family != family:
        raise UserError(f"--load {args.load} holds {spec.timm_name}, a {spec.family} model: run it with "
                        f"{FAMILY_SCRIPTS[spec.family]}")
    if args.model is not None and resolve_model(args.model).timm_name != spec.timm_name:
        raise UserError(f"--model {args.model} does not match --load {args.load}, which holds {spec.timm_name}: "
                        "leave --model out or pass that model")
    for flag in ('w_bits', 'a_bits'):
        given = getattr(args, flag)
        if given is not None and given != payload[flag]:
            raise UserError(f"--{flag} {given} does not match --load {args.load}, quantized with {flag} "
                            f"{payload[flag]}: leave --{flag} out")
    return spec, payload['w_bits'], payload['a_bits']


def build_float_model(args, spec, device):
    """The full-precision model and where its weights came from ('checkpoint', 'pretrained', 'random')."""
    if args.checkpoint is not None:
        weights = 'checkpoint'
    elif args.demo and not pretrained_cached(spec.timm_name):
        weights = 'random'  # --demo never downloads
    else:
        weights = 'pretrained'
    model = build_model(spec.timm_name, pretrained=weights == 'pretrained', checkpoint=args.checkpoint,
                        trust_checkpoint=args.trust_checkpoint)
    if weights == 'random':
        torch.manual_seed(args.seed)
        randomize_layernorms(model)
    return model.to(device), weights


def quantize(model, train_set, args, spec, w_bits, a_bits, weights, dist_info, timer):
    """RepQ-ViT on one calibration batch, then QwT on ``--qwt_samples`` images, then ``--save``.
    Returns (meta: how the model was made, also stored in the saved file; stage seconds)."""
    with timer('calibration_data'):
        calib = calibration_batch(train_set, args, dist_info)
    repq_times = {}
    with timer('repq'):
        repq_vit(model, calib, w_bits, a_bits, per_channel_loop=args.calib_search == 'per_channel',
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
    meta = {'weights': weights, 'seed': args.seed, 'world_size': dist_info.world_size,
            'num_calib': int(calib.shape[0]), 'num_qwt': args.qwt_samples, 'start_block': args.start_block,
            'qwt_solver': args.qwt_solver, 'qwt_accumulate': args.qwt_accumulate,
            'calib_search': args.calib_search, 'qwt_blocks': qwt_stats}
    if args.save and dist_info.is_main:  # before evaluation: a finished fit is never lost
        with timer('save'):
            save_quantized(model, args.save, spec.name, spec.timm_name, w_bits, a_bits, meta)
        _logger.info('saved the quantized model to %s', args.save)
    stage_times = {**{f'repq_{k}': round(v, 3) for k, v in repq_times.items()},
                   **{f'qwt_{k}': round(v, 3) for k, v in qwt_times.items()}}
    return meta, stage_times


def run(args, family):
    """Run the pipeline for parsed ``args``; returns the result dict (written on rank 0)."""
    if args.demo and args.data_dir is None:
        with tempfile.TemporaryDirectory(prefix='qwt_demo_') as data_dir:
            make_demo_data(data_dir)
            return run(argparse.Namespace(**{**vars(args), 'data_dir': data_dir}), family)
    payload = read_saved(args.load, trust=args.trust_checkpoint) if args.load else None
    spec, w_bits, a_bits = resolve_run_model(args, family, payload)
    if args.output_dir is None:  # --load: name the folder after the saved model
        args = argparse.Namespace(**{**vars(args), 'output_dir': os.path.join(
            'output', f"{spec.name}_w{w_bits}a{a_bits}_loaded")})
    dist_info = distributed.init_distributed(args.device, args.local_rank)
    if dist_info.device.type == 'cpu':
        keep_freed_memory()
    setup_logging(args.output_dir, dist_info.is_main)
    seed_everything(args.seed + dist_info.rank)
    timer = Stopwatch(dist_info.device)
    _logger.info('==== %s', ' '.join(sys.argv))
    _logger.info('%s (%s) W%d/A%d on %s x %d', spec.name, spec.timm_name, w_bits, a_bits,
                 dist_info.device, dist_info.world_size)

    with timer('data'):  # folders are checked before any weights are fetched
        val_set = image_folder(args.data_dir, 'val', None)
        val_total, val_data = len(val_set), val_set if args.num_val is None else val_subset(val_set, args.num_val)
        train_set = None if payload else image_folder(args.data_dir, 'train', None)
        if train_set is not None:
            check_train_size(train_set, args)
    with timer('build'):
        if payload:
            model, _ = load_quantized(args.load, dist_info.device, payload)
            weights, meta = 'loaded', payload['meta']
        else:
            model, weights = build_float_model(args, spec, dist_info.device)
            meta = {}
        cfg = model.default_cfg
        mean, std = spec.mean or cfg['mean'], spec.std or cfg['std']
        val_set.transform = eval_transform(mean, std, spec.crop_pct or cfg['crop_pct'])
        if train_set is not None:
            train_set.transform = train_transform(mean, std)
    _logger.info('%s weights; train %s images, val %d images, %d classes', weights,
                 'n/a' if train_set is None else len(train_set), len(val_set), len(val_set.classes))

    stage_times = {}
    if payload is None:
        meta, stage_times = quantize(model, train_set, args, spec, w_bits, a_bits, weights, dist_info, timer)
    accuracy = {}
    wanted = {'both': ('repq', 'qwt'), 'repq': ('repq',), 'qwt': ('qwt',), 'none': ()}[args.eval]
    if not compensated_blocks(model):  # a --load file saved without QwT
        wanted = tuple(w for w in wanted if w == 'repq')
    if wanted:
        with timer('eval'):
            loader = eval_loader(val_data, args.batch_size, args.num_workers, dist_info)
            accuracy = evaluate({name: _variant(model, name == 'qwt') for name in wanted}, loader,
                                dist_info.device, progress=dist_info.is_main)
    set_compensation(model, True)
    qwt_stats = meta.get('qwt_blocks', [])

    result = {
        'model': spec.name, 'timm_name': spec.timm_name, 'w_bits': w_bits, 'a_bits': a_bits,
        'seed': meta.get('seed', args.seed), 'world_size': dist_info.world_size, 'device': str(dist_info.device),
        'weights': weights, 'source_weights': meta.get('weights'), 'demo': bool(args.demo),
        'loaded_from': args.load, 'saved_to': args.save,
        'num_val': len(val_data), 'val_total': val_total,
        **{k: meta.get(k) for k in ('num_calib', 'num_qwt', 'start_block', 'qwt_solver', 'qwt_accumulate',
                                    'calib_search')},
        'repq_top1': accuracy.get('repq', {}).get('top1'), 'repq_top5': accuracy.get('repq', {}).get('top5'),
        'qwt_top1': accuracy.get('qwt', {}).get('top1'), 'qwt_top5': accuracy.get('qwt', {}).get('top5'),
        'repq_size_mb': round(model_size_mb(model, include_compensation=False), 4),
        'qwt_size_mb': round(model_size_mb(model, include_compensation=True), 4),
        'qwt_blocks': qwt_stats,
        'timings': {**timer.rounded(), **stage_times},
        'versions': versions(),
    }
    if dist_info.is_main:
        write_text_atomic(os.path.join(args.output_dir, 'result.json'), json.dumps(result, indent=2) + '\n')
        for line in summary_lines(result):
            _logger.info(line)
        rows, _ = table.build_rows(table.load_paper(), [dict(result, path='this run')], only_results=True)
        _logger.info('compared with the paper:\n%s', table.to_markdown(rows))
    distributed.barrier()
    return result


def _variant(model, compensated):
    """logits of ``model`` with the QwT terms on (RepQ-ViT + QwT) or off (RepQ-ViT)."""
    def fn(x):
        set_compensation(model, compensated)
        return model(x)
    return fn


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
    """Entry point of both scripts: parse, run, clean up. A user error exits 2 with one line on stderr
    and no traceback (QWT_TRACEBACK=1 shows it); Ctrl-C exits 130."""
    args = parse_args(family, argv)
    try:
        return run(args, family)
    except KeyboardInterrupt:
        print('error: interrupted', file=sys.stderr)
        log_to_file('error: interrupted')
        sys.exit(130)
    except (UserError, OSError, ValueError, RuntimeError, MemoryError) as e:
        out_of_memory = (isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError))
                         or "can't allocate memory" in str(e))
        if os.environ.get('QWT_TRACEBACK') or (isinstance(e, RuntimeError) and not out_of_memory):
            raise  # a RuntimeError other than memory is a bug: keep its traceback
        hint = ': lower --batch_size' if out_of_memory else ''
        message = f'error: {one_line(e)}{hint}'
        print(message, file=sys.stderr)
        log_to_file(message)  # the run's log says why it stopped
        sys.exit(2)
    finally:
        distributed.cleanup()
        teardown_logging()
