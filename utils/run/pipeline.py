"""The whole run behind the three entry scripts: the --ptq method (default RepQ-ViT for ViT/DeiT and Swin,
Percentile for ResNet; utils.run.ptq), then QwT, then evaluation, for one process or many, drawing the
calibration and QwT images exactly as the published runs do (SPEC §1b, §3b; utils.run.draws). The families
differ in what utils.run.family says; the record is utils.run.record's."""
import argparse
import copy
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field

import torch

from models import data_config, default_cfg, resolve_model
from quant import qwt_compensate, set_compensation
from quant.qwt import compensated_blocks
from quant.saved_model import load_quantized, read_saved, save_quantized
from quant.wrap import replay_wrap_draws
from utils.core import distributed
from utils.table import results as table
from utils.core.allocator import keep_freed_memory
from utils.run.naming import FAMILY_SCRIPTS, output_folder
from utils.run.data import (ImageLog, available_cpus, eval_loader, eval_transform, image_dataset,
                            replay_loader_iteration_draw, train_transform, val_subset, workers_note)
from utils.run import family as families, ptq as ptq_methods
from utils.run import finetune_stage  # QwT*
from utils.run.demo import DEMO_THREADS, demo_line, demo_threads_line, make_demo_data
from utils.run.draws import build_float_model, calibration_and_model, dump_inputs, qwt_batches, seed_everything
from utils.run.launch import launch_command
from utils.run.record import make_result, qwt_block_lines, summary_lines  # noqa: F401 (qwt_block_lines: tests)
from utils.run.loaded import check_load_flags
from utils.core.errors import UserError, one_line
from utils.run.evaluate import evaluate
from utils.core.files import write_text_atomic
from utils.run.logs import log_to_file, setup_logging, teardown_logging
from utils.run.memory import describe as describe_memory_error, is_out_of_memory
from utils.core.timing import Stopwatch

_logger = logging.getLogger('qwt')
VARIANTS = {'both': ('ptq', 'qwt'), 'ptq': ('ptq',), 'repq': ('ptq',), 'qwt': ('qwt',), 'none': (), 'fp': ('fp',),
            'all': ('fp', 'ptq', 'qwt')}  # 'repq': the older name of 'ptq'


@dataclass
class Run:
    """What every step of one run needs."""
    args: argparse.Namespace
    family: str
    spec: object
    w_bits: int
    a_bits: int
    payload: dict            # the --load file, or None
    dist: distributed.DistInfo
    timer: Stopwatch
    images: ImageLog = field(default_factory=ImageLog)
    checkpoint: str = None   # the float weights file (ResNet: found by utils.run.weights), or None
    tuned: object = None     # QwT*: utils.run.finetune_stage.Tuned after fine-tuning, else None

    @property
    def ptq(self):
        """The run's PTQ method (utils.run.ptq): --ptq, or the --load file's."""
        name = (self.payload or {}).get('meta', {}).get('ptq') if self.payload else getattr(self.args, 'ptq', None)
        return ptq_methods.METHODS[name or ptq_methods.DEFAULTS[self.family]]

    @property
    def method(self):
        return self.ptq.label


@dataclass
class Splits:
    val: object              # the whole val split
    val_data: object         # what is evaluated (a --num_val subset, or the whole split)
    train: object = None     # None where no calibration runs (--load, --eval fp)


# ---- the run's setting -------------------------------------------------------------------------

def resolve_run_model(args, family, payload):
    """(ModelSpec, w_bits, a_bits) of this run: from the flags, or from the --load file, which must
    agree with any flag given."""
    if payload is None:
        return resolve_model(args.model, family), args.w_bits, args.a_bits
    spec = resolve_model(payload['timm_name'])
    if spec.family != family:
        raise UserError(f"--load {args.load} holds {spec.timm_name}, a {spec.family} model: run it with "
                        f"{FAMILY_SCRIPTS[spec.family]}")
    if args.model is not None and resolve_model(args.model).timm_name != spec.timm_name:
        raise UserError(f"--model {args.model} does not match --load {args.load}, which holds {spec.timm_name}: "
                        "leave --model out or pass that model")
    for dest in ('w_bits', 'a_bits'):
        given = getattr(args, dest)
        if given is not None and given != payload[dest]:
            raise UserError(f"--{dest} {given} does not match --load {args.load}, quantized with {dest} "
                            f"{payload[dest]}: leave --{dest} out")
    check_load_flags(args, payload.get('meta'))
    return spec, payload['w_bits'], payload['a_bits']


def command_line(args, family):
    """This run's whole launch (launcher, processes per node, nodes), shell-quoted so that it can be pasted back."""
    script = sys.argv[0] if os.path.basename(sys.argv[0]) in FAMILY_SCRIPTS.values() else FAMILY_SCRIPTS[family]
    return launch_command(script, getattr(args, '_argv', sys.argv[1:]), os.environ)


def prepare(args, family):
    """The Run: model and bits, process group, log, seeds (SPEC §1b step 1)."""
    payload = read_saved(args.load, trust=args.trust_checkpoint) if args.load else None
    spec, w_bits, a_bits = resolve_run_model(args, family, payload)
    finetune_stage.check_loaded(args, payload)  # QwT*
    if args.output_dir is None:  # --load: name the folder after the saved model
        args = argparse.Namespace(**{**vars(args), 'output_dir': output_folder(spec.name, w_bits, a_bits, loaded=True)})
    dist_info = distributed.init_distributed(args.device, args.local_rank, args.dist_timeout)
    if args.demo and dist_info.device.type == 'cpu':
        torch.set_num_threads(DEMO_THREADS)  # the demo's figures must not depend on the core count
    threads = distributed.limit_cpu_threads()  # never raises the count: the log line says what runs
    if dist_info.device.type == 'cpu':
        keep_freed_memory()
    setup_logging(args.output_dir, dist_info.is_main)
    seed_everything(args.seed)
    _logger.info('==== %s', command_line(args, family))
    _logger.info('%s (%s) W%d/A%d on %s x %d', spec.name, spec.timm_name, w_bits, a_bits,
                 dist_info.device, dist_info.world_size)
    if dist_info.note:
        _logger.info(dist_info.note)
    _logger.info('CPU threads: %d per process (%d CPUs available, %d process(es) on this node); val loader '
                 'workers: %d', *threads, args.eval_workers)
    if args.demo:
        _logger.info(demo_line(spec.name, w_bits, a_bits, ptq_methods.label_of(getattr(args, 'ptq', None), family)))
        if dist_info.device.type == 'cpu':
            _logger.info(demo_threads_line(torch.get_num_threads(), torch.backends.cpu.get_cpu_capability()))
    checkpoint = args.checkpoint
    if family == 'resnet' and payload is None:
        checkpoint = families.resnet_checkpoint(spec, args)
        families.check_resnet_run(spec, args, checkpoint)  # before any data is read
        if checkpoint is not None:
            _logger.info('weights: %s', checkpoint)
    return Run(args, family, spec, w_bits, a_bits, payload, dist_info, Stopwatch(dist_info.device),
               checkpoint=checkpoint)


def open_splits(run):
    """val/ (and train/ where calibration runs) through timm's ImageDataset with the model's transforms;
    the folders are checked before any weights are fetched."""
    args, cfg = run.args, data_config(run.spec)
    strict = args.strict_images
    val = image_dataset(args.data_dir, 'val', eval_transform(cfg['mean'], cfg['std'], cfg['crop_pct'],
                                                             cfg['interpolation'], cfg['img_size']), strict)
    val_data = val if args.num_val is None else val_subset(val, args.num_val)
    train = None
    if (run.payload is None and args.eval != 'fp') or finetune_stage.needs_train(args):  # QwT*: also after --load
        train = image_dataset(args.data_dir, 'train', train_transform(cfg['mean'], cfg['std'], cfg['interpolation'],
                                                                      cfg['img_size']), strict)
        need = args.batch_size + args.qwt_samples
        if run.payload is None and len(train) < need:
            raise UserError(f"{train.parser.root} has {len(train)} images, fewer than the calibration batch "
                            f"(--batch_size {args.batch_size}) plus --qwt_samples {args.qwt_samples} = {need}: "
                            "add images or lower those flags")
    for split in (val, train):
        if split is not None:
            check_classes(split, run.spec.timm_name, args.allow_class_subset)
    if train is not None and finetune_stage.needs_train(args):
        finetune_stage.check_train_classes(train, run.spec.timm_name)  # QwT*
    _logger.info('train %s images, val %d images, %d classes', 'n/a' if train is None else len(train), len(val),
                 len(val.classes))
    note = train is not None and workers_note(args.num_workers, available_cpus())
    if note:
        _logger.info(note)
    return Splits(val, val_data, train)


def check_classes(split, timm_name, allow_subset):
    """Labels are class-folder indices: a split with another number of classes than the model scores
    against the wrong labels, without a word."""
    n_model, n_split = default_cfg(timm_name)['num_classes'], len(split.classes)
    if n_split != n_model and not allow_subset:
        raise UserError(f"{split.parser.root} has {n_split} class folders, but {timm_name} predicts {n_model} "
                        "classes: labels are folder indices, so accuracy would be scored against the wrong labels. "
                        f"Use the full ImageNet layout ({n_model} synset folders), or pass --allow_class_subset")


# ---- the stages ----------------------------------------------------------------------------------

@dataclass
class Quantized:
    """What the PTQ method + QwT made."""
    model: object
    weights: str             # where the float weights came from
    meta: dict               # how the model was made (also stored by --save)
    accuracy: dict           # of an evaluation made before QwT (--eval ptq), else empty
    stage_times: dict        # seconds of the calibration and QwT stages
    float_model: object = None  # --eval all: a copy of the full-precision model, made before calibration


def draw_inputs(run, splits):
    """--dump_inputs: every draw of SPEC §1b up to the QwT images, as a full run makes them, then the
    calibration batch and QwT images written for comparison with the published run."""
    calib, calib_files, model, _ = calibration_and_model(run, splits)
    replay_wrap_draws(model)  # step 4's draws; calibration (step 5) makes none
    for _ in range(families.EVAL_DRAWS_BEFORE_QWT[run.family]):
        replay_loader_iteration_draw()  # step 6: the published evaluations' loaders (ResNet: FP, Percentile)
    images, qwt_files = qwt_batches(run, splits.train)
    dump_inputs(run, calib, calib_files, images, qwt_files)


def quantize(run, splits):
    """SPEC §1b steps 2-7 around the PTQ method (utils.run.ptq) and QwT: a Quantized."""
    args, timer, method = run.args, run.timer, run.ptq
    calib, calib_files, model, weights = calibration_and_model(run, splits)
    # a copy draws nothing (SPEC §1b); QwT reads a third-party quantizer's full-precision targets from it
    keep = args.eval == 'all' or finetune_stage.needs_teacher(args)  # QwT*: the teacher of the distill loss
    float_model = copy.deepcopy(model) if keep or method.fp_model else None
    ptq_times = {}
    with timer('ptq'):  # steps 4 and 5
        method.function()(model, calib, run.w_bits, run.a_bits, args, ptq_times, run.dist.is_main)
    _logger.info('%s calibration done in %.1f s', run.method, timer.seconds['ptq'])
    early, draws = {}, families.EVAL_DRAWS_BEFORE_QWT[run.family]
    if args.eval in ('ptq', 'repq'):  # step 6 as published: the PTQ model is evaluated before QwT
        early = evaluate_variants(run, splits, {'ptq': model})
        draws -= 1
    for _ in range(draws):  # step 6's draws, for evaluations made later (one pass) or not at all
        replay_loader_iteration_draw()
    with timer('qwt_data'):
        images, qwt_files = qwt_batches(run, splits.train)
    qwt_stats, qwt_times = [], {}
    fp_model = {'fp_model': float_model} if method.fp_model else {}  # else: the bit-identical published path
    with timer('qwt'):
        qwt_compensate(model, images, start_block=args.start_block, batch_size=args.batch_size,
                       solver=args.qwt_solver, accumulate=args.qwt_accumulate, progress=run.dist.is_main,
                       stats=qwt_stats, timings=qwt_times, **families.qwt_options(run.family, args), **fp_model)
    del images
    _logger.info('QwT compensation done in %.1f s (%d of %d blocks compensated)', timer.seconds['qwt'],
                 sum(s['used'] for s in qwt_stats), len(qwt_stats))
    meta = {'weights': weights, 'seed': args.seed, 'world_size': run.dist.world_size,
            'num_calib': len(calib_files), 'num_qwt': len(qwt_files), 'start_block': args.start_block,
            'qwt_solver': args.qwt_solver, 'qwt_accumulate': args.qwt_accumulate,
            'calib_search': args.calib_search, **families.method_meta(run.family, method, args),
            'qwt_blocks': qwt_stats, 'calib_files': calib_files, 'qwt_files': qwt_files}
    if args.save and run.dist.is_main:  # before evaluation: a finished fit is never lost
        with timer('save'):
            save_quantized(model, args.save, run.spec.name, run.spec.timm_name, run.w_bits, run.a_bits, meta)
        _logger.info('saved the quantized model to %s', args.save)
    stage_times = {**{f'ptq_{k}': round(v, 3) for k, v in ptq_times.items()},
                   **{f'qwt_{k}': round(v, 3) for k, v in qwt_times.items()}}
    return Quantized(model, weights, meta, early, stage_times, float_model if keep else None)


def evaluate_variants(run, splits, variants):
    """Top-1 / top-5 of each ``variants[name]`` model on the val data, one pass over the images."""
    wanted = {name: _variant(model, name in ('qwt', 'qwtstar')) for name, model in variants.items()}
    if run.tuned is not None:  # QwT*: the QwT and the fine-tuned W, b and head, swapped in per batch
        wanted = run.tuned.wrap(wanted)
    with run.timer('eval'):
        loader = eval_loader(splits.val_data, run.args.batch_size, run.args.eval_workers, run.dist)
        return evaluate(wanted, loader, run.dist.device, progress=run.dist.is_main,
                        on_batch=lambda batch: run.images.note_skips(batch[3]))


def _variant(model, compensated):
    """logits of ``model`` with the QwT terms on (PTQ + QwT) or off (PTQ, full precision)."""
    def fn(x):
        set_compensation(model, compensated)
        return model(x)
    return fn


def run(args, family):
    """Run the pipeline for parsed ``args``; returns the result dict (written on rank 0), or None after
    --dump_inputs."""
    if args.demo and args.data_dir is None:
        with tempfile.TemporaryDirectory(prefix='qwt_demo_') as data_dir:
            make_demo_data(data_dir, args.model)
            return run(argparse.Namespace(**{**vars(args), 'data_dir': data_dir, '_generated_data': True}), family)
    r = prepare(args, family)
    args = r.args
    with r.timer('data'):
        splits = open_splits(r)
    meta, accuracy, stage_times, float_model = {}, {}, {}, None
    if r.payload is not None:
        with r.timer('build'):
            model, _ = load_quantized(args.load, r.dist.device, r.payload)
        weights, meta = 'loaded', r.payload['meta']
    elif args.eval == 'fp':
        with r.timer('build'):
            model, weights = build_float_model(r)
    elif args.dump_inputs:
        draw_inputs(r, splits)
        return None  # --dump_inputs ends the run here, before calibration
    else:
        q = quantize(r, splits)
        model, weights, meta, accuracy, stage_times = q.model, q.weights, q.meta, q.accuracy, q.stage_times
        float_model = q.float_model
    r.tuned = finetune_stage.run_stage(r, splits, model, float_model, build_float_model, meta)  # QwT*, if asked
    wanted = [v for v in VARIANTS[args.eval] if v not in accuracy]
    wanted += ['qwtstar'] if r.tuned is not None and args.eval != 'none' else []  # QwT*
    if not compensated_blocks(model):  # a --load file saved without QwT
        wanted = [w for w in wanted if w != 'qwt']
    if wanted:
        accuracy.update(evaluate_variants(r, splits, {name: float_model if name == 'fp' and float_model is not None
                                                      else model for name in wanted}))
    if r.tuned is not None:
        r.tuned.load('after')  # QwT*: the run ends with the fine-tuned model
    set_compensation(model, True)
    result = make_result(r, splits, model, weights, meta, accuracy, stage_times, float_model)
    if r.dist.is_main:
        path = os.path.join(args.output_dir, 'result.json')
        write_text_atomic(path, json.dumps(result, indent=2) + '\n')
        for line in summary_lines(result):
            _logger.info(line)
        _logger.info('wrote %s (and the log %s)', os.path.abspath(path),
                     os.path.abspath(os.path.join(args.output_dir, 'log.txt')))
        rows, _ = table.build_rows(table.load_paper(), [dict(result, path='this run')], only_results=True)
        _logger.info('compared with the paper:\n%s', table.to_markdown(rows))
    distributed.barrier()
    return result


def main(family, args):
    """Run parsed ``args`` (utils.run.cli.parse_args), then clean up. A UserError, or running out of
    memory, exits 2 with one line on stderr and no traceback (QWT_TRACEBACK=1 shows it); anything else is
    a bug and keeps its traceback; Ctrl-C exits 130."""
    try:
        return run(args, family)
    except KeyboardInterrupt:
        print('error: interrupted', file=sys.stderr)
        log_to_file('error: interrupted')
        sys.exit(130)
    except (UserError, MemoryError, RuntimeError) as e:
        if os.environ.get('QWT_TRACEBACK') or not (isinstance(e, UserError) or is_out_of_memory(e)):
            raise
        if isinstance(e, UserError):
            message = f'error: {one_line(e)}'
        else:
            message = f'error: {describe_memory_error(e, one_line(e))}'
        print(message, file=sys.stderr)
        log_to_file(message)  # the run's log says why it stopped
        sys.exit(2)
    finally:
        distributed.cleanup()
        teardown_logging()
