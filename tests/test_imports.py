"""No import circle anywhere in the project: every .py file's imports, at module level and inside functions
(``from quant.x import y`` in a function body included), make a graph of project modules without a cycle."""
import ast
import os

import pytest

from conftest import ROOT


def project_files(root):
    """Every .py file under ``root``, hidden folders and caches left out."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.') and d != '__pycache__')
        for name in sorted(files):
            if name.endswith('.py'):
                yield os.path.join(folder, name)


def _resolve(name, roots):
    """The project file that ``import name`` loads from one of ``roots``, or None (not a project module)."""
    parts = name.split('.')
    for root in roots:
        base = os.path.join(root, *parts)
        for path in (base + '.py', os.path.join(base, '__init__.py')):
            if os.path.isfile(path):
                return os.path.normpath(path)
    return None


def _package(path, root):
    """The dotted package a file belongs to ('quant' for quant/qwt.py and for quant/__init__.py)."""
    rel = os.path.relpath(os.path.dirname(path), root)
    return '' if rel == '.' else rel.replace(os.sep, '.')


def imported_files(path, root):
    """The project files ``path`` imports anywhere in its body. ``from a import b`` is an edge to module
    a.b where that is a module, else to a (b is a name in it); ``import a.b`` to a.b. Scripts and tests
    also import their own folder's modules (``from conftest import ...``)."""
    tree = ast.parse(open(path, encoding='utf-8').read(), filename=path)
    roots = (root, os.path.dirname(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [_resolve(alias.name, roots) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ''
            if node.level:  # relative: from the file's package, up level - 1
                package = _package(path, root).split('.') if _package(path, root) else []
                package = package[:len(package) - (node.level - 1)]
                module = '.'.join(p for p in (*package, module) if p)
            targets = [_resolve(f'{module}.{alias.name}' if module else alias.name, roots)
                       or _resolve(module, roots) for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t and t != os.path.normpath(path))
    return found


def import_graph(root):
    return {os.path.normpath(p): imported_files(p, root) for p in project_files(root)}


def find_cycle(graph):
    """One import circle as a list of files (first == last), or None."""
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            if cycle:
                return cycle
    return None


def _rel(cycle, root):
    return ' -> '.join(os.path.relpath(p, root) for p in cycle)


def test_no_import_circle():
    graph = import_graph(ROOT)
    assert len(graph) > 100 and any(graph.values())  # the scan found the project and its imports
    cycle = find_cycle(graph)
    assert cycle is None, 'import circle: ' + _rel(cycle, ROOT)


@pytest.mark.parametrize('inside_function', [False, True])
def test_a_circle_is_found(tmp_path, inside_function):
    """A two-module circle through a package, one of its imports inside a function, as quant/qwt.py and
    quant/qwt_conv.py had it; and the same files without the circle."""
    pkg = tmp_path / 'pkg'
    pkg.mkdir()
    (pkg / '__init__.py').write_text('from pkg.a import f\n')
    body = '    from pkg.a import f\n' if inside_function else ''
    (pkg / 'a.py').write_text('import os\nfrom . import b\n\ndef f():\n    return b.g()\n')
    (pkg / 'b.py').write_text(('def g():\n' + body + '    return 1\n') if inside_function else
                              'from pkg.a import f\n\ndef g():\n    return 1\n')
    (tmp_path / 'script.py').write_text('import pkg.a\n')
    cycle = find_cycle(import_graph(str(tmp_path)))
    assert _rel(cycle, str(tmp_path)) == 'pkg/a.py -> pkg/b.py -> pkg/a.py'
    (pkg / 'b.py').write_text('def g():\n    return 1\n')
    graph = import_graph(str(tmp_path))
    assert find_cycle(graph) is None
    assert graph[str(pkg / 'a.py')] == {str(pkg / 'b.py')} and graph[str(tmp_path / 'script.py')] == {str(pkg / 'a.py')}
