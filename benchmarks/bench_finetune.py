"""QwT* fine-tuning throughput (issue 28): images/s of quant.finetune on a quantized + QwT model (the fake
quantizers' straight-through gradients, the float32 compensation branch, and for the distill loss the teacher's
forward), against a plain forward + backward of the float model through the same layers at the same batch, in one
run on the same device (random weights and images: nothing is downloaded, nothing is read).

    python benchmarks/bench_finetune.py [--model deit_tiny] [--batch_size 32] [--steps 4] [--device cpu]
"""
import argparse
import copy
import os
import platform
import sys
import tempfile
import time

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import build_model, data_config, default_cfg, randomize_batchnorms, randomize_layernorms, resolve_model  # noqa: E402
from models.registry import DIGITS_MODELS  # noqa: E402
from quant import percentile_ptq, qwt_compensate, repq_vit  # noqa: E402


def quantized_model(name, w_bits, a_bits, size, qwt_images, device):
    """(float model, PTQ + QwT model) of ``name`` (random weights; the digits models' own), calibrated on random
    images."""
    spec = resolve_model(name)
    torch.manual_seed(0)
    digits = spec.timm_name in DIGITS_MODELS
    model = build_model(spec.timm_name, pretrained=digits)
    if not digits:
        (randomize_batchnorms if spec.family == 'resnet' else randomize_layernorms)(model, 0)
    model = model.to(device)
    float_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    calib = torch.randn(32, 3, size, size, generator=gen).to(device)
    (percentile_ptq if spec.family == 'resnet' else repq_vit)(model, calib, w_bits, a_bits)
    qwt_compensate(model, torch.randn(qwt_images, 3, size, size, generator=gen).to(device), batch_size=32)
    return float_model, model


def float_forward_backward(model, images, labels, batch_size, steps, device):
    """Seconds of ``steps`` plain forward + backward passes (cross-entropy, every parameter's gradient) of the
    float model, after one warm-up step."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(i):
        x = images[i * batch_size:(i + 1) * batch_size].to(device)
        y = labels[i * batch_size:(i + 1) * batch_size].to(device)
        loss_fn(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    step(0)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def finetune_seconds(model, teacher, dataset, loss, batch_size, steps, device):
    """(seconds, images) of quant.finetune over ``steps`` steps (its own timing; one warm-up run first)."""
    from quant.finetune import FinetuneConfig, finetune
    with tempfile.TemporaryDirectory(prefix='bench_finetune_') as tmp:
        cfg = FinetuneConfig(epochs=1, max_images=batch_size, batch_size=batch_size, loss=loss, workers=0,
                             checkpoint_every=10 ** 6)
        finetune(copy.deepcopy(model), dataset, cfg, os.path.join(tmp, 'warm.pth'), device, teacher=teacher,
                 progress=False)
        cfg = FinetuneConfig(epochs=1, max_images=batch_size * steps, batch_size=batch_size, loss=loss, workers=0,
                             checkpoint_every=10 ** 6)
        result = finetune(copy.deepcopy(model), dataset, cfg, os.path.join(tmp, 'run.pth'), device, teacher=teacher,
                          progress=False)
    return result.seconds, result.images_seen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='deit_tiny')
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--steps', type=int, default=4, help='timed steps of each (after one warm-up step)')
    p.add_argument('--size', type=int, default=None, help="image side (default: the model's input size)")
    p.add_argument('--w_bits', type=int, default=4)
    p.add_argument('--a_bits', type=int, default=4)
    p.add_argument('--qwt_images', type=int, default=64)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.size = args.size or data_config(resolve_model(args.model))['img_size']
    float_model, model = quantized_model(args.model, args.w_bits, args.a_bits, args.size, args.qwt_images, device)
    n = args.batch_size * args.steps
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(n, 3, args.size, args.size, generator=gen)
    classes = default_cfg(resolve_model(args.model).timm_name)['num_classes']
    labels = torch.randint(0, classes, (n,), generator=gen)
    dataset = TensorDataset(images, labels)
    t_float = float_forward_backward(float_model, images, labels, args.batch_size, args.steps, device)
    rows = [('float model forward + backward', n / t_float)]
    for loss in ('label', 'distill'):
        seconds, seen = finetune_seconds(model, float_model if loss == 'distill' else None, dataset, loss,
                                         args.batch_size, args.steps, device)
        rows.append((f'QwT* fine-tuning, {loss} loss', seen / seconds))
    print(f'# {args.model} W{args.w_bits}/A{args.a_bits}, batch {args.batch_size}, {args.steps} steps '
          f'of {args.size}x{args.size}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), {device} '
          f'({torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()})')
    print('| what | images/s | vs float fwd+bwd |')
    print('|---|---|---|')
    for name, ips in rows:
        print(f'| {name} | {ips:.1f} | {ips / rows[0][1]:.2f}x |')
    return rows


if __name__ == '__main__':
    main()
