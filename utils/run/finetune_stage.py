"""The QwT* stage of the entry scripts (issue 28): after the closed-form QwT fit, quant.finetune trains every
compensation block's W, b and the head(s) on the train split; this module makes its inputs from the run (data,
teacher, recipe, checkpoint in the output folder), keeps the QwT state beside the fine-tuned one so that one val
pass evaluates PTQ, PTQ + QwT and PTQ + QwT*, and says what the run's records gain. A rerun of the same command in
the same output folder (a SLURM requeue does exactly that) resumes from the checkpoint."""
import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from models import default_cfg
from utils.core.errors import UserError
from utils.run.finetune_flags import CHECKPOINT_FILE, finetuning

_logger = logging.getLogger('qwt')
CURVE_POINTS = 20      # result.json keeps a short loss curve


@dataclass
class Tuned:
    """What the stage made: the QwT state (before) and the QwT* state (after) of the trainable parameters, and
    the library's FinetuneResult."""
    params: dict         # name -> the model's nn.Parameter (quant.finetune.trainable_parameters)
    before: dict         # name -> tensor: W, b and head as the closed-form fit left them
    after: dict          # name -> tensor: fine-tuned
    result: object       # quant.finetune.FinetuneResult

    def load(self, which):
        """Put the ``which`` ('before' or 'after') state into the model."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(getattr(self, which)[name])

    def wrap(self, variants):
        """{name: logits fn} with the states swapped in per batch: PTQ and PTQ + QwT read the QwT head and W, b;
        'qwtstar' the fine-tuned ones (the full-precision model has neither)."""
        def with_state(fn, which):
            def run(x):
                self.load(which)
                return fn(x)
            return run
        return {name: fn if name == 'fp' else with_state(fn, 'after' if name == 'qwtstar' else 'before')
                for name, fn in variants.items()}


class Pairs(torch.utils.data.Dataset):
    """(image, label) of the run's ImageDataset, whose items also carry the index used and the skip note."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index][:2]


def config(args):
    """quant.finetune.FinetuneConfig from the flags."""
    from quant.finetune import FinetuneConfig
    return FinetuneConfig(epochs=args.finetune_epochs, max_images=args.finetune_images,
                          batch_size=args.finetune_batch_size, lr=args.finetune_lr, weight_decay=args.finetune_wd,
                          warmup_steps=args.finetune_warmup, loss=args.finetune_loss, mixup=args.mixup,
                          cutmix=args.cutmix, smoothing=args.smoothing, checkpoint_every=args.checkpoint_every,
                          seed=args.seed, workers=args.num_workers)


def checkpoint_path(output_dir):
    return os.path.join(output_dir, CHECKPOINT_FILE)


def needs_teacher(args):
    """The distill loss needs the full-precision model's logits: the pipeline keeps a copy made before PTQ."""
    return finetuning(args) and args.finetune_loss == 'distill'


def needs_train(args):
    """Fine-tuning reads the train split, also after --load."""
    return finetuning(args)


def check_loaded(args, payload):
    """--finetune_epochs with --load: the file must hold a QwT model (fine-tuning trains its W, b)."""
    if finetuning(args) and payload is not None and not payload.get('compensated'):
        raise UserError(f"--finetune_epochs {args.finetune_epochs} with --load {args.load}: the file holds a model "
                        "without QwT (nothing to fine-tune); --save a model after QwT, or leave out --finetune_epochs")


def check_train_classes(train, timm_name):
    """Labels are class-folder indices: fine-tuning on a folder with more classes than the model has outputs
    would train against labels the head does not have (even with --allow_class_subset)."""
    n_model, n_train = default_cfg(timm_name)['num_classes'], len(train.classes)
    if n_train > n_model:
        raise UserError(f"{train.parser.root} has {n_train} class folders, but {timm_name} predicts {n_model} classes: "
                        "QwT* fine-tuning trains on folder-index labels; use a train/ with the model's classes")


def teacher_for_load(run, build_float_model):
    """The distill loss after --load: the float model the file was made from, built again (timm's pretrained
    weights, the digits models' files, a ResNet's published file); a random-weight model cannot be rebuilt."""
    source = (run.payload.get('meta') or {}).get('weights')
    if run.family == 'resnet' and run.checkpoint is None:
        from utils.run import family as families
        run = dataclasses.replace(run, checkpoint=families.resnet_checkpoint(run.spec, run.args))
    model, weights = (None, 'random') if source == 'random' else build_float_model(run)
    if weights == 'random':
        raise UserError(f"--load {run.args.load} was made from random weights, which cannot be rebuilt as the "
                        "teacher of --finetune_loss distill: use --finetune_loss label")
    return model


def run_stage(run, splits, model, float_model, build_float_model, meta):
    """Fine-tune ``model`` (after QwT) if the flags ask for it, then --save it again (``meta`` plus the
    fine-tuning's record); a Tuned, or None with --finetune_epochs 0. The distill loss's teacher is
    ``float_model`` (the copy made before PTQ), or after --load the float model built again."""
    args = run.args
    if not finetuning(args):
        return None
    from quant.finetune import finetune, trainable_parameters
    from quant.saved_model import save_quantized
    check_train_classes(splits.train, run.spec.timm_name)
    teacher = float_model
    if run.payload is not None and needs_teacher(args):
        teacher = teacher_for_load(run, build_float_model)
    params = dict(trainable_parameters(model))
    before = {n: p.detach().clone() for n, p in params.items()}
    cfg = config(args)
    _logger.info("QwT*: fine-tuning %d tensors (%d values: every block's W, b and the head) for %d epoch(s), %s "
                 'loss, batch %d per process, lr %g', len(params), sum(p.numel() for p in params.values()),
                 cfg.epochs, cfg.loss, cfg.batch_size, cfg.lr)
    with run.timer('finetune'):
        result = finetune(model, Pairs(splits.train), cfg, checkpoint_path(args.output_dir), run.dist.device,
                          teacher=teacher, progress=run.dist.is_main)
    after = {n: p.detach().clone() for n, p in params.items()}
    _logger.info('QwT* fine-tuning done in %.1f s: %d steps, %d images%s', result.seconds, result.steps,
                 result.images_seen, '' if result.resumed_from is None else f' (resumed from step {result.resumed_from})')
    tuned = Tuned(params, before, after, result)
    if args.save and run.dist.is_main:
        save_quantized(model, args.save, run.spec.name, run.spec.timm_name, run.w_bits, run.a_bits,
                       {**meta, 'finetune': record(tuned)})
        _logger.info('saved the fine-tuned (QwT*) model to %s', args.save)
    return tuned


def short_curve(curve, points=CURVE_POINTS):
    """At most ``points`` (step, loss) pairs of ``curve``, evenly spaced, the last one kept."""
    curve = [(int(s), float(l)) for s, l in curve]
    if len(curve) <= points:
        return [list(p) for p in curve]
    picks = sorted({round(i * (len(curve) - 1) / (points - 1)) for i in range(points)})
    return [list(curve[i]) for i in picks]


def record(tuned):
    """The result.json's 'finetune' entry (None without fine-tuning)."""
    if tuned is None:
        return None
    r = tuned.result
    return {'recipe': dict(r.recipe), 'steps': r.steps, 'images_seen': r.images_seen,
            'loss_curve': short_curve(r.loss_curve), 'seconds': round(r.seconds, 3), 'resumed_from': r.resumed_from}


def fields(accuracy, tuned, payload=None):
    """The result.json fields of QwT*: qwtstar_top1/top5 and the 'finetune' record. A --load of a fine-tuned file
    evaluates its fine-tuned model as 'qwt': reported as QwT* (its QwT state before training is not in the file)."""
    loaded = ((payload or {}).get('meta') or {}).get('finetune')
    out = {}
    star = accuracy.get('qwtstar', {})
    if tuned is None and loaded:
        star = accuracy.get('qwt', {})
        out = {'qwt_top1': None, 'qwt_top5': None}
    return {**out, 'qwtstar_top1': star.get('top1'), 'qwtstar_top5': star.get('top5'),
            'finetune': record(tuned) or loaded}


def summary_line(result, method):
    """The end-of-run line of QwT*, or None."""
    if result.get('qwtstar_top1') is None:
        return None
    return (f"{method + ' + QwT*'} top-1 {result['qwtstar_top1']:.2f}  top-5 {result['qwtstar_top5']:.2f}  "
            f"({result['finetune']['steps']} steps, {result['finetune']['images_seen']} images)")
