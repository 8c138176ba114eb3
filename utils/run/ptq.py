"""The post-training quantizers behind ``--ptq``: one entry each. Adding a quantizer is one module (its quantize
function) and one entry in ``METHODS``; the pipeline calls whatever the entry names. Imports nothing of torch
(the flags are checked before torch loads): the quantize function is named by 'module:function' and imported
when the run quantizes.

A quantize function is ``fn(model, calib_images, w_bits, a_bits, options, timings, progress)``: it quantizes
``model`` in place (eval mode) on the calibration batch; ``options`` is the run's parsed flags, ``timings`` a
dict that receives the seconds of its stages, ``progress`` whether to show a bar."""
import importlib
import importlib.util
import os
from dataclasses import dataclass

from utils.core.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALL_FAMILIES = ('vit', 'swin', 'resnet')


@dataclass(frozen=True)
class PTQMethod:
    name: str              # the --ptq value
    label: str             # named in logs, result.json, tables and figures
    families: tuple        # the families it applies to
    quantize: str          # 'module:function'
    fp_model: bool         # QwT's full-precision targets from a float copy (fp_model=); False: the project's
    #                        quantizers switched off on the model itself (the published, bit-identical path)
    requires: str = None   # a package the method imports, checked before torch loads
    flags: tuple = ()      # the method's own flags (dest, published default); elsewhere they must stay at that

    def function(self):
        module, name = self.quantize.split(':')
        return getattr(importlib.import_module(module), name)


METHODS = {m.name: m for m in (
    PTQMethod('repq', 'RepQ-ViT', ('vit', 'swin'), 'quant.ptq.project:repq', fp_model=False,
              flags=(('calib_search', 'vectorized'),)),
    PTQMethod('percentile', 'Percentile', ('resnet',), 'quant.ptq.project:percentile', fp_model=False,
              flags=(('calib_search', 'vectorized'), ('conv_a_bits', '8'))),
    PTQMethod('brevitas-minmax', 'brevitas min-max', ALL_FAMILIES, 'quant.ptq.brevitas_ptq:minmax_ptq', fp_model=True,
              requires='brevitas'),
    PTQMethod('brevitas-gptq', 'brevitas GPTQ', ALL_FAMILIES, 'quant.ptq.brevitas_ptq:gptq_ptq', fp_model=True,
              requires='brevitas'),
)}
# The published script's quantizer of each family: the default --ptq, whose runs are bit-identical to before.
DEFAULTS = {'vit': 'repq', 'swin': 'repq', 'resnet': 'percentile'}


def default(family):
    return METHODS[DEFAULTS[family]]


def label_of(name, family):
    """The label of ``--ptq name`` (None: the family's default)."""
    return METHODS[name or DEFAULTS[family]].label


def locked_version(package, lock=os.path.join(ROOT, 'requirements-lock.txt')):
    """``package``'s version in requirements-lock.txt, or None."""
    try:
        with open(lock) as f:
            for line in f:
                name, _, version = line.strip().partition('==')
                if name.lower() == package.lower() and version:
                    return version
    except OSError:
        pass
    return None


def installed(package):
    """Whether ``package`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it
        return False


def check(name, family):
    """The PTQMethod of ``--ptq name`` for ``family``, or a one-line UserError: unknown, not for this family, or
    needing a package that is not installed."""
    if name not in METHODS:
        raise UserError(f"--ptq {name}: unknown method; choose one of {', '.join(METHODS)}")
    method = METHODS[name]
    if family not in method.families:
        fits = [n for n, m in METHODS.items() if family in m.families]
        raise UserError(f"--ptq {name} ({method.label}) does not apply to {family} models; for them choose one of "
                        f"{', '.join(fits)}")
    if method.requires and not installed(method.requires):
        version = locked_version(method.requires)
        raise UserError(f"--ptq {name} needs {method.requires}, which is not installed: "
                        f"pip install {method.requires}{'==' + version if version else ''}")
    return method


def check_flags(method, args):
    """A UserError naming the first flag of another method (RepQ-ViT's --calib_search, Percentile's
    --conv_a_bits) set on a run of ``method``, which would ignore it."""
    own = dict(method.flags)
    for other in METHODS.values():
        for dest, published in other.flags:
            given = getattr(args, dest, published)
            if dest not in own and given != published:
                raise UserError(f"--{dest} {given} applies to --ptq {other.name} only, not to --ptq {method.name}: "
                                f"leave out --{dest}")
