"""What differs between the families' runs (SPEC §1b, §3b): the fields naming the PTQ method, the QwT options,
how many evaluation-loader iterations the published script makes between calibration and the QwT images, and
the ResNet checks made before anything heavy runs."""
import torch

from models.registry import DIGITS_MODELS
from quant.qwt_conv import check_conv_qwt_args
from utils.core.errors import UserError
from utils.run.weights import find_weights

# SPEC §1b step 6 / §3b: the published ViT and Swin scripts evaluate the RepQ-ViT model before QwT (one
# eval-loader iteration); the ResNet script evaluates the FP model, then the Percentile model (two).
EVAL_DRAWS_BEFORE_QWT = {'vit': 1, 'swin': 1, 'resnet': 2}


def qwt_options(family, args):
    """The QwT keyword arguments of this family beyond the common ones."""
    return {'kernel_size': args.kernel_size, 'factor': args.factor} if family == 'resnet' else {}


def method_meta(family, method, args):
    """The result.json / --save fields that name the PTQ method (``method``: a utils.run.ptq.PTQMethod) and
    the ResNet options (None elsewhere)."""
    resnet = family == 'resnet'
    return {'ptq': method.name, 'method': method.label, 'kernel_size': args.kernel_size if resnet else None,
            'factor': args.factor if resnet else None, 'conv_a_bits': args.conv_a_bits if resnet else None}


def resnet_checkpoint(spec, args):
    """The float weights file of a ResNet run: --checkpoint; the committed file of the digits ResNet; None
    (random weights) for --demo of a table ResNet; else the published file in --checkpoint_dir or
    pretrained_weights/ (utils.run.weights)."""
    if args.checkpoint is None and spec.timm_name in DIGITS_MODELS:
        from models.digits import WEIGHTS
        return WEIGHTS[spec.timm_name]
    if args.checkpoint is None and args.demo:
        return None
    return find_weights(spec.timm_name, args.checkpoint, args.checkpoint_dir)


def _meta_model(spec):
    """``spec``'s timm model on the meta device: its shapes, no memory, and no draw from the global
    generator (SPEC §1b: the real build comes after the calibration batch)."""
    import timm
    with torch.device('meta'):
        return timm.create_model(spec.timm_name, pretrained=False, drop_path_rate=0.0)


def check_resnet_run(spec, args, checkpoint):
    """Before any data is read: the QwT grouping fits every block's channels (quant.check_conv_qwt_args)
    and the weights file fits the model (keys and shapes), each a one-line UserError."""
    from models import state_dict_mismatches
    from models.build import _read_state_dict
    model = check_grouping(spec, args.kernel_size, args.factor)
    if checkpoint is not None:
        problems = state_dict_mismatches(model.state_dict(), _read_state_dict(checkpoint, args.trust_checkpoint))
        if problems:
            raise UserError(f"checkpoint {checkpoint} does not fit {spec.timm_name}: {'; '.join(problems)}. Pass "
                            "the weights of this model, or the --model they were trained as")


def check_grouping(spec, kernel_size, factor):
    """The QwT grouping of ``kernel_size`` and ``factor`` against every block's channels of ``spec``'s model
    (quant.check_conv_qwt_args), built on the meta device; returns that model. tools/reproduce.py checks it
    too, before it plans any cell."""
    from models import block_channels, walk
    model = _meta_model(spec)
    check_conv_qwt_args(kernel_size, factor, [block_channels(s.module) for s in walk(model)])
    return model
