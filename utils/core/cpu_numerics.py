"""The CPU settings that make the ``--demo`` figures the same on every x86-64 CPU (issue 29).

At two to four bits a fake-quantized activation near a rounding step flips with the last bit of a float sum,
and the libraries pick their kernels by the CPU they find: ATen's vectorised kernels (AVX512, AVX2 or none:
other lane counts, FMA or not), MKL's matrix products (a code path per instruction set) and oneDNN's
convolutions (a JIT kernel per instruction set). The same demo gave 92.80 to 93.60 on one AVX2 CPU by these
settings alone. Pinned to the level every x86-64 CPU runs, each library runs one code path in one order:

- ``ATEN_CPU_CAPABILITY=default``: ATen's kernels without explicit vector instructions;
- ``MKL_CBWR=COMPATIBLE``: MKL's conditional numerical reproducibility, one SSE2 path on any x86-64 CPU,
  Intel or AMD (``MKL_ENABLE_INSTRUCTIONS`` then changes nothing);
- ``ONEDNN_MAX_CPU_ISA=SSE41``: oneDNN's lowest JIT level;
- one thread (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``): sums in one order whatever the core count.

They are read when torch loads, so they are set before torch is imported, for the digits ``--demo`` runs
only (the figures the README quotes): a full-size run, and the random-weight demo of a full-size model, keep
the fastest kernels. Other architectures (aarch64: no MKL, other kernels) compute
other roundings; the demo says so. This module imports nothing of torch.
"""
import os
import platform
import sys

PIN = (('ATEN_CPU_CAPABILITY', 'default'), ('MKL_CBWR', 'COMPATIBLE'), ('ONEDNN_MAX_CPU_ISA', 'SSE41'),
       ('OMP_NUM_THREADS', '1'), ('MKL_NUM_THREADS', '1'))
PINNED_ARCHS = ('x86_64', 'AMD64')   # platform.machine() of x86-64 (Linux, Windows)
OTHER_ARCH_EXAMPLE = 'aarch64'       # named in the log and the README: not covered by the pin


def pin_cpu_numerics(environ=None, modules=None):
    """Set PIN in ``environ`` (os.environ), values the user set included, unless torch is already imported
    (``modules``: sys.modules): then it would come too late, and nothing is changed. Returns whether it pinned."""
    environ = os.environ if environ is None else environ
    if 'torch' in (sys.modules if modules is None else modules):
        return False
    environ.update(PIN)
    return True


def is_pinned(environ=None):
    environ = os.environ if environ is None else environ
    return all(environ.get(name) == value for name, value in PIN)


def pin_line(capability, threads, environ=None, machine=None):
    """The demo's log line: what its CPU figures hold for, and whether they are pinned."""
    environ = os.environ if environ is None else environ
    machine = machine or platform.machine()
    settings = ', '.join(f'{name}={value}' for name, value in PIN)
    if not is_pinned(environ):
        return (f'demo: {threads} CPU thread(s), {capability} kernels, not pinned (the digits demos pin them before '
                'torch loads, utils/core/cpu_numerics.py; a random-weight demo has no figures to hold)')
    if machine not in PINNED_ARCHS:
        return (f'demo: {threads} CPU thread(s), {capability} kernels ({settings}); this is {machine}, not x86-64: '
                'its kernels round differently, so the figures can differ from the README\'s, which hold on '
                'every x86-64 CPU')
    return (f'demo: {threads} CPU thread(s), {capability} kernels ({settings}): the same figures on every x86-64 '
            f'CPU (the README\'s demo table); other architectures ({OTHER_ARCH_EXAMPLE}, ...) can differ')
