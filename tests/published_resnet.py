"""Runs the published ResNet code (../shared/published-qwt: its utils/resnet.py, quant/ and the functions of
qwt_resnet_group_conv_only_percentile.py, unchanged) on given weights and images and saves what it computes:
every quantizer's scale and zero point, the Percentile logits, every block's W, b and r², and the
Percentile + QwT logits. A process of its own with the published folder first on sys.path (its `utils` and
`quant` shadow this project's); harness only: `.cuda()` and `torch.cuda.synchronize` are no-ops, and
torch.quantile refuses more than --quantile_limit values as the torch of the published runs did above 2^24.

    python published_resnet.py PUBLISHED_DIR IN.pth OUT.pth
IN.pth: a list of cases, each {'state_dict', 'block' ('basic'|'bottleneck'), 'layers', 'num_classes', 'calib', 'qwt', 'eval',
'w_bits', 'a_bits', 'kernel_size', 'factor', 'start_block', 'batch_size', 'quantile_limit'}."""
import importlib.util
import os
import sys

import torch
from torch import nn


_QUANTILE = torch.quantile


def _harness(quantile_limit):
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None

    def old_quantile(x, *a, **k):
        if x.numel() > quantile_limit:
            raise RuntimeError('quantile() input tensor is too large')
        return _QUANTILE(x, *a, **k)
    torch.quantile = old_quantile


def main(published, src, out):
    cases = torch.load(src, weights_only=False)
    sys.path.insert(0, published)
    torch.save([run_case(published, cfg) for cfg in cases], out)


def run_case(published, cfg):
    _harness(cfg['quantile_limit'])
    from utils.resnet import BasicBlock, Bottleneck, ResNet
    from quant import quant_model_resnet, set_quant_state
    from quant.quantizer import UniformQuantizer

    model = ResNet(BasicBlock if cfg['block'] == 'basic' else Bottleneck, cfg['layers'], num_classes=cfg['num_classes'])
    model.load_state_dict(cfg['state_dict'])
    model.eval()
    q_model = quant_model_resnet(model, input_quant_params={'n_bits': cfg['a_bits'], 'channel_wise': False},
                                 weight_quant_params={'n_bits': cfg['w_bits'], 'channel_wise': True})
    q_model.eval()
    set_quant_state(q_model, input_quant=True, weight_quant=True)
    with torch.no_grad():
        q_model(cfg['calib'])
        percentile_logits = q_model(cfg['eval'])[1]
    quantizers = {name: (m.delta, m.zero_point, m.n_bits) for name, m in q_model.named_modules()
                  if isinstance(m, UniformQuantizer)}

    script = os.path.join(published, 'qwt_resnet_group_conv_only_percentile.py')
    argv = sys.argv
    sys.argv = [script, '--w_bits', str(cfg['w_bits']), '--a_bits', str(cfg['a_bits']), '--kernel_size',
                str(cfg['kernel_size']), '--factor', str(cfg['factor']), '--start_block', str(cfg['start_block']),
                '--batch_size', str(cfg['batch_size']), '--num_workers', '0']
    spec = importlib.util.spec_from_file_location('published_resnet_script', script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # module level: argparse, its log folder under the working directory
    sys.argv = argv
    mod.args.device = 'cpu'
    mod.LINEAR_COMPENSATION_SAMPLES = len(cfg['qwt'])  # the harness's QwT image count (published: 512)
    fits = []
    regression = mod.lienar_regression

    def recording(*a, **k):
        w, b, r2 = regression(*a, **k)
        fits.append((w.clone(), b.clone(), r2.clone()))
        return w, b, r2
    mod.lienar_regression = recording
    loader = [(batch, None) for batch in cfg['qwt'].split(cfg['batch_size'])]
    q_model = mod.generate_compensation_model(q_model, loader, mod.args)
    q_model.eval()
    with torch.no_grad():
        qwt_logits = q_model(cfg['eval'])[1]
    final = [(m.lora_weight.detach(), m.lora_bias.detach()) for m in q_model.modules()
             if type(m).__name__ == 'CompensationBlock']
    return {'quantizers': quantizers, 'percentile_logits': percentile_logits, 'fits': fits, 'final': final,
            'qwt_logits': qwt_logits, 'threads': torch.get_num_threads()}


if __name__ == '__main__':
    main(*sys.argv[1:4])
