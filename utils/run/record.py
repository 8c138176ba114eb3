"""The run's record: result.json's dict and the summary lines the log ends with. The PTQ method is named
(``ptq``: the --ptq name, ``method``: its label) and its figures sit under method-neutral keys (``ptq_top1``,
``ptq_top5``, ``ptq_size_mb``; timings ``ptq`` and ``ptq_*``) beside ``qwt_*``."""
import os
import sys

import numpy as np
import torch

from models import default_cfg
from quant import model_size_mb
from quant.qwt_fit import overflow_hint_for
from utils.core import distributed
from utils.run import finetune_stage
from utils.run.logs import warning_count

VARIANT_KEYS = ('fp', 'ptq', 'qwt')


def make_result(run, splits, model, weights, meta, accuracy, stage_times, float_model=None):
    """The result.json dict."""
    args = run.args
    quantized = run.payload is not None or args.eval != 'fp'
    skipped = sorted({f for part in distributed.all_gather_object(run.images.skipped) for f in part})
    top = {f'{v}_top{k}': accuracy.get(v, {}).get(f'top{k}') for v in VARIANT_KEYS for k in (1, 5)}
    return {
        'model': run.spec.name, 'timm_name': run.spec.timm_name, 'ptq': run.ptq.name, 'method': run.method,
        'w_bits': run.w_bits, 'a_bits': run.a_bits,
        'eval': args.eval, 'seed': meta.get('seed', args.seed), 'world_size': run.dist.world_size,
        'device': str(run.dist.device), 'weights': weights, 'source_weights': meta.get('weights', weights),
        # a folder the demo generated is removed after the run: no path that does not exist
        'demo': bool(args.demo), 'data_dir': None if getattr(args, '_generated_data', False) else os.path.abspath(args.data_dir),
        'checkpoint': run.checkpoint and os.path.abspath(run.checkpoint),
        'loaded_from': args.load, 'saved_to': args.save,
        'num_val': len(splits.val_data), 'val_total': len(splits.val),
        # labels are folder indices: a folder of another number of classes is not an ImageNet row (table: 'classes')
        'num_classes': len(splits.val.classes), 'train_classes': None if splits.train is None else len(splits.train.classes),
        'model_classes': default_cfg(run.spec.timm_name)['num_classes'],
        'allow_class_subset': bool(args.allow_class_subset),
        **{k: meta.get(k) for k in ('num_calib', 'num_qwt', 'start_block', 'qwt_solver', 'qwt_accumulate',
                                    'calib_search', 'kernel_size', 'factor', 'conv_a_bits')},
        **top,
        **finetune_stage.fields(accuracy, run.tuned, run.payload),  # QwT*
        'fp_size_mb': round(model_size_mb(float_model if quantized else model), 4)
        if float_model is not None or not quantized else None,
        'ptq_size_mb': round(model_size_mb(model, include_compensation=False), 4) if quantized else None,
        'qwt_size_mb': round(model_size_mb(model, include_compensation=True), 4) if quantized else None,
        'qwt_blocks': meta.get('qwt_blocks', []),
        'skipped_images': skipped,
        'calib_files': meta.get('calib_files'), 'qwt_files': meta.get('qwt_files'),
        'timings': {**run.timer.rounded(), **stage_times},
        'versions': versions(),
        'numerics': numerics(run.dist.device),
        'warnings': warning_count(),
    }


def numerics(device):
    """What decides float results besides the code (issue 24): the device, the CUDA / cuDNN builds, TF32 and
    cuDNN's algorithm choice. The published runs used torch's defaults (TF32 off for matmuls, on for cuDNN
    convolutions) with cudnn.benchmark and cudnn.deterministic set by their seed function, as here."""
    import platform
    cuda = device.type == 'cuda'
    return {'device_name': torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
            'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
            else None, 'tf32_matmul': torch.backends.cuda.matmul.allow_tf32, 'tf32_cudnn': torch.backends.cudnn.allow_tf32,
            'float32_matmul_precision': torch.get_float32_matmul_precision(),
            'cudnn_benchmark': torch.backends.cudnn.benchmark, 'cudnn_deterministic': torch.backends.cudnn.deterministic,
            'cpu_threads': torch.get_num_threads()}


def versions():
    import PIL
    import timm
    import torchvision
    out = {'python': sys.version.split()[0], 'torch': torch.__version__, 'torchvision': torchvision.__version__,
           'timm': timm.__version__, 'numpy': np.__version__, 'pillow': PIL.__version__}
    if 'brevitas' in sys.modules:  # a --ptq brevitas-* run
        out['brevitas'] = sys.modules['brevitas'].__version__
    return out


def _pct(v):
    return 'n/a' if v is None else f'{v:.2f}'


def summary_lines(r):
    lines = [f"== {r['model']} W{r['w_bits']}/A{r['a_bits']}, {r['num_val']} val images, "
             f"{r['world_size']} process(es) =="]
    if r['fp_top1'] is not None:
        lines.append(f"full precision top-1 {_pct(r['fp_top1'])}  top-5 {_pct(r['fp_top5'])}  size "
                     f"{r['fp_size_mb']:.2f} MB")
    if r['ptq_size_mb'] is not None:
        m = r.get('method') or 'RepQ-ViT'
        width = len(m) + len(' + QwT')
        lines += [f"{m:<{width}} top-1 {_pct(r['ptq_top1'])}  top-5 {_pct(r['ptq_top5'])}  size "
                  f"{r['ptq_size_mb']:.2f} MB",
                  f"{m + ' + QwT':<{width}} top-1 {_pct(r['qwt_top1'])}  top-5 {_pct(r['qwt_top5'])}  size "
                  f"{r['qwt_size_mb']:.2f} MB"]
        lines += [x for x in [finetune_stage.summary_line(r, m)] if x]  # QwT*
    solver = None if r.get('kernel_size') is not None else r.get('qwt_solver')  # ResNet's kind has no solver choice
    lines += qwt_block_lines(r.get('qwt_blocks') or [], solver)
    if r['skipped_images']:
        lines.append(f"skipped {len(r['skipped_images'])} unreadable image(s), listed in result.json "
                     "(skipped_images)")
    lines.append('timings (s): ' + ', '.join(f'{k} {v}' for k, v in r['timings'].items()))
    if r.get('warnings'):
        lines.append(f"{r['warnings']} warning(s) above: the lines marked WARNING (also in log.txt)")
    return lines


def qwt_block_lines(blocks, solver='inverse'):
    """The end-of-run count of the QwT blocks compensated and left out, naming those left out for a
    numerically singular fit or an fp16 overflow (with the hint of quant.qwt_fit.overflow_hint_for ``solver``)."""
    if not blocks:
        return []
    left = [b for b in blocks if not b['used']]
    singular = [str(b['block']) for b in left if b.get('singular')]
    overflow = [str(b['block']) for b in left if b.get('fp16_overflow')]
    reasons = []
    if singular:
        reasons.append(f"{len(singular)} for a numerically singular fit: block {', '.join(singular)}; --qwt_solver "
                       "lstsq fits them")
    if overflow:
        reasons.append(f"{len(overflow)} whose fit overflows half precision: block {', '.join(overflow)}; "
                       f"{overflow_hint_for(solver)}")
    line = f"QwT: {len(blocks) - len(left)} of {len(blocks)} blocks compensated, {len(left)} left out"
    return [line + (f" ({'; '.join(reasons)})" if reasons else '')]
