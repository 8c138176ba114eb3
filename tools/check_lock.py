"""Check this Python environment against requirements-lock.txt, the exact versions the test suite passed with.

    python tools/check_lock.py [--lock requirements-lock.txt] [--requirements requirements.txt ...]

One line per problem, exit 1 if any (0 and one summary line otherwise):
- a locked package installed at another version (a local build label such as ``+cpu`` or ``+cu130`` is not a
  difference: pip's ``torch==X`` accepts ``X+cpu`` too);
- a package that the requirements pull in (their whole dependency tree, markers evaluated here) missing
  from the lock, or not installed;
- with ``--exact`` (CI's own environment), any installed package the lock does not name (a leftover, such as a
  pytest plugin, that a fresh install would not have).
A torch from pytorch.org's own index (``2.14.1+cu126``, ``+cpu``: the README's route for other drivers) brings
its own CUDA libraries (``nvidia-*-cu12``, ``cuda-*``, ``triton``) at other versions than PyPI's build; those
are that build's business and are not checked.
Stdlib only, so that it runs before anything is installed.
"""
import argparse
import importlib.metadata as metadata
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLING = {'pip'}  # the installer itself: not a dependency of the project, not locked
ACCELERATOR_BUILDS = ('torch',)  # a local label (+cu126, +cpu) means pytorch.org's build, with its own CUDA stack
_BUILD_LIBRARY = re.compile(r'^(nvidia-.*|cuda-.*|triton|pytorch-triton.*)$')
_NAME = re.compile(r'^\s*([A-Za-z0-9][A-Za-z0-9._-]*)')


def canonical(name):
    """PEP 503 name: 'Jinja2' -> 'jinja2', 'typing_extensions' -> 'typing-extensions'."""
    return re.sub(r'[-_.]+', '-', name).lower()


def public(version):
    return version.split('+', 1)[0]


def read_lock(path):
    """{canonical name: version} of the ``name==version`` lines."""
    lock = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.split('#', 1)[0].strip()
            if not line:
                continue
            name, sep, version = line.partition('==')
            if not sep or not version.strip():
                raise ValueError(f'{path}:{n}: expected name==version, got {line!r}')
            lock[canonical(name.strip())] = version.strip()
    return lock


def read_requirements(path):
    """The top-level requirement lines of a requirements file (options and comments skipped)."""
    with open(path) as f:
        return [ln.split('#', 1)[0].strip() for ln in f if ln.split('#', 1)[0].strip() and not ln.lstrip().startswith('-')]


def _marker_ok(requirement, extras):
    """Whether a ``Requires-Dist`` line applies here (packaging evaluates its marker; without packaging,
    lines with a marker count as applying unless they name an extra)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return 'extra ==' not in requirement
    marker = Requirement(requirement).marker
    if marker is None:
        return True
    return any(marker.evaluate({'extra': e}) for e in extras or ('',))


def closure(top, installed_requires):
    """Canonical names of ``top`` and everything they require, through ``installed_requires(name)`` ->
    [Requires-Dist strings] (None when the package is not installed)."""
    seen, todo = set(), [(canonical(_NAME.match(r).group(1)), ()) for r in top]
    while todo:
        name, extras = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for req in installed_requires(name) or ():
            if _marker_ok(req, extras):
                todo.append((canonical(_NAME.match(req).group(1)), ()))
    return seen


def _installed():
    return {canonical(d.metadata['Name']): d for d in metadata.distributions() if d.metadata['Name']}


def build_libraries(installed):
    """Names of the CUDA libraries that an accelerator build with a local label pulls in (empty for PyPI's
    torch): ``nvidia-*``, ``cuda-*``, ``triton`` reached from that build, which the lock cannot pin."""
    builds = [n for n in ACCELERATOR_BUILDS if n in installed and '+' in installed[n].version]
    if not builds:
        return set()
    reached = closure(builds, lambda name: installed[name].requires if name in installed else None)
    return {n for n in reached if _BUILD_LIBRARY.match(n)}


def problems(lock, requirements, installed, exact=False):
    """Lines naming each difference between ``installed`` ({name: distribution}) and ``lock``."""
    lines = []
    exempt = build_libraries(installed)
    needed = closure(requirements, lambda name: installed[name].requires if name in installed else None) - exempt
    for name in sorted(needed):
        if name not in lock:
            have = f' {installed[name].version}' if name in installed else ''
            lines.append(f'{name}{have}: pulled in by the requirements but not in the lock (regenerate the lock)')
        elif name not in installed:
            lines.append(f'{name}: not installed (the lock says {lock[name]})')
    for name, version in sorted(lock.items()):
        if name in installed and name not in exempt and public(installed[name].version) != public(version):
            lines.append(f'{name}: installed {installed[name].version}, the lock says {version}')
    if exact:
        for name in sorted(set(installed) - set(lock) - needed - TOOLING - exempt):
            lines.append(f'{name} {installed[name].version}: installed but not in the lock (a leftover a fresh '
                         'install would not have: uninstall it, or use a new environment)')
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--lock', default=os.path.join(ROOT, 'requirements-lock.txt'))
    p.add_argument('--requirements', nargs='+', default=[os.path.join(ROOT, 'requirements.txt')],
                   help='requirements files, or single requirements such as matplotlib')
    p.add_argument('--exact', action='store_true', help='also refuse installed packages that the lock does not name')
    args = p.parse_args(argv)
    top = []
    for r in args.requirements:
        top += read_requirements(r) if os.path.isfile(r) else [r]
    lock = read_lock(args.lock)
    lines = problems(lock, top, _installed(), exact=args.exact)
    for line in lines:
        print(f'lock: {line}', file=sys.stderr)
    if lines:
        print(f'lock: this environment differs from {os.path.relpath(args.lock)} in {len(lines)} package(s); '
              'install with: pip install -r requirements.txt -c requirements-lock.txt', file=sys.stderr)
        return 1
    print(f'lock: {len(lock)} packages as locked in {os.path.relpath(args.lock)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
