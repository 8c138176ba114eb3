"""Run a classification script (this project's entry scripts, or the published QwT code unchanged) and record
what its model computed: every call of the root model (its logits, in call order) and, once the script ends,
each QwT block's compensation W, b. benchmarks/gpu_check.py holds two such records side by side.

    python benchmarks/script_logits.py --out ours.pth [--weights CKPT] [--tiny] [--isolate] [--cpu] -- \\
        SCRIPT --model deit_small --data_dir DIR ...

--weights CKPT: a model the script asks timm for with pretrained=True is built without weights and loads CKPT
(strict), so both scripts start from the same random weights and nothing is downloaded. --tiny: the timm
architectures the script asks for are built small (same classes, same 224x224 input; the dry run's stand-ins).
--isolate: the project's own packages are hidden from the script (the published code has its own ``utils``
and ``quant``). --cpu: a script written for one GPU runs on the CPU (as tools/capture_inputs.py --cpu).
"""
import argparse
import contextlib
import os
import runpy
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.run.cli import quiet_known_warnings  # noqa: E402

quiet_known_warnings()

# The dry run's stand-ins: the same timm classes at 224x224, a few thousand parameters per block.
TINY = {'VisionTransformer': dict(img_size=224, patch_size=32, embed_dim=48, depth=2, num_heads=2),
        'SwinTransformer': dict(img_size=224, patch_size=4, window_size=7, embed_dim=24, depths=(2, 2),
                                num_heads=(2, 4))}


def tiny_model(name, **kwargs):
    """timm 0.4.12's ``name`` (whatever module registered it last: timm's or a script's own copy) built at
    the TINY size of its class."""
    from timm.models.registry import model_entrypoint
    module = sys.modules[model_entrypoint(name).__module__]
    cls_name = 'SwinTransformer' if name.startswith('swin') else 'VisionTransformer'
    keep = {k: v for k, v in kwargs.items() if k in ('drop_path_rate', 'num_classes')}
    return getattr(module, cls_name)(**TINY[cls_name], **({'distilled': True} if 'distilled' in name else {}), **keep)


@contextlib.contextmanager
def substituted_models(weights=None, tiny=False):
    """timm.create_model, patched: ``tiny`` builds TINY stand-ins; ``weights`` replaces pretrained weights."""
    import timm
    real = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        model = tiny_model(name, **kwargs) if tiny else real(name, pretrained=pretrained and not weights, **kwargs)
        if pretrained and weights:
            state = torch.load(weights, map_location='cpu', weights_only=True)
            model.load_state_dict(state.get('model', state) if isinstance(state, dict) else state)
        return model
    timm.create_model = create_model
    try:
        yield
    finally:
        timm.create_model = real


class RootCalls:
    """Global forward hooks: the logits of every call of a whole model (a module called from outside any
    module, with an image batch, returning [batch, classes]; a script's own (features, logits) pair counts by
    its last item), in order, and the last such model (the quantized one, once compensated)."""

    def __init__(self):
        self.depth, self.root, self.outputs = 0, None, []

    def pre(self, module, args):
        self.depth += 1

    def post(self, module, args, output):
        self.depth -= 1
        if self.depth or not (args and torch.is_tensor(args[0]) and args[0].dim() == 4):
            return
        logits = output[-1] if isinstance(output, (tuple, list)) else output
        if torch.is_tensor(logits) and logits.dim() == 2 and logits.shape[0] == args[0].shape[0]:
            self.root = module
            self.outputs.append(logits.detach().float().cpu())

    @contextlib.contextmanager
    def installed(self):
        from torch.nn.modules import module as module_mod
        handles = [module_mod.register_module_forward_pre_hook(self.pre),
                   module_mod.register_module_forward_hook(self.post)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def compensation(root):
    """[(W, b)] of the QwT blocks under ``root``, in module order: this project's CompensatedBlock
    (comp_weight, comp_bias) or the published CompensationBlock (lora_weight, lora_bias)."""
    pairs = []
    for m in root.modules() if root is not None else ():
        for w, b in (('comp_weight', 'comp_bias'), ('lora_weight', 'lora_bias')):
            if isinstance(getattr(m, w, None), torch.Tensor):
                pairs.append((getattr(m, w).detach().float().cpu(), getattr(m, b).detach().float().cpu()))
    return pairs


def run(script, script_args, weights=None, tiny=False, isolate=False, cpu=False):
    """Run ``script`` as __main__; returns {'logits': [...], 'compensation': [(W, b)], 'exit': code}."""
    from utils.run.data import fix_posterize
    from utils.table.capture import cuda_on_cpu, without_packages_of
    fix_posterize()  # the published code crashes on Pillow 13 without it (SPEC §1, 'Known trap')
    calls = RootCalls()
    argv, path, code = sys.argv, list(sys.path), 0
    sys.argv = [script, *script_args]
    try:
        with contextlib.ExitStack() as stack:
            if isolate:
                stack.enter_context(without_packages_of(ROOT))
            if cpu:
                stack.enter_context(cuda_on_cpu())
            stack.enter_context(substituted_models(weights, tiny))
            stack.enter_context(calls.installed())
            sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
            try:
                runpy.run_path(script, run_name='__main__')
            except SystemExit as e:
                code = e.code or 0
    finally:
        sys.argv, sys.path[:] = argv, path
    return {'logits': calls.outputs, 'compensation': compensation(calls.root), 'exit': code}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True)
    p.add_argument('--weights', default=None)
    p.add_argument('--tiny', action='store_true')
    p.add_argument('--isolate', action='store_true')
    p.add_argument('--cpu', action='store_true')
    p.add_argument('script')
    p.add_argument('script_args', nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    script_args = args.script_args[1:] if args.script_args[:1] == ['--'] else args.script_args
    record = run(args.script, script_args, args.weights, args.tiny, args.isolate, args.cpu)
    torch.save(record, args.out)
    print(f"recorded {len(record['logits'])} root-model calls and {len(record['compensation'])} QwT blocks "
          f"to {args.out} (exit {record['exit']})", file=sys.stderr)
    sys.exit(record['exit'])


if __name__ == '__main__':
    main()
