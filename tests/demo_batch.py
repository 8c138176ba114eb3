"""Several digits demos, each run as ``python SCRIPT --demo FLAGS --output_dir OUT`` runs it, in a process forked
per demo from one that pinned the CPU kernels (utils.core.cpu_numerics, as the demo does) and then imported
torch, timm and brevitas: their import (5 to 9 s of CPU per process) is paid once, and every demo still starts
from a process state of its own. For the tests that run many demos (test_ptq_demos.py, test_readme_demo.py's
sentences); the demo table's own rows run as fresh processes (their CPU time bounds include the imports).

    python demo_batch.py JOBS.json   # JOBS: [{"key", "argv": [script, flags...], "stdout": path, "out": folder}];
                                     # writes JOBS.json.out: [(exit code, CPU seconds)] per job
"""
import json
import os
import runpy
import subprocess
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demos(demos, tmp, env=None):
    """{demo.key: (result.json, CPU seconds of the demo's process and its loader workers, stdout, output folder)}
    of ``demos`` (tools.readme_figures.Demo, one process each), run in a batch process with ``env`` added."""
    jobs = []
    for d in demos:
        assert d.procs == 1, f'{d.key}: a batch runs one-process demos'
        out = os.path.join(tmp, d.key)
        jobs.append({'key': d.key, 'argv': d.argv(out)[1:], 'stdout': os.path.join(tmp, f'{d.key}.stdout'), 'out': out})
    path = os.path.join(tmp, 'jobs.json')
    with open(path, 'w') as f:
        json.dump(jobs, f)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), path], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.load(open(path + '.out'))
    runs = {}
    for job, (rc, cpu) in zip(jobs, done):
        stdout = open(job['stdout']).read()
        assert rc == 0, f"{' '.join(job['argv'])} exited {rc}: {open(job['stdout'] + '.err').read()[-3000:]}"
        runs[job['key']] = (json.load(open(os.path.join(job['out'], 'result.json'))), cpu, stdout, job['out'])
    return runs


def _run(job):
    """In the forked child: the script as __main__ with its argv, stdout to the job's file, stderr beside it."""
    for fd, path in ((1, job['stdout']), (2, job['stdout'] + '.err')):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = list(job['argv'])
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name='__main__')
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: B902 - the child reports everything through its exit code and output
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(path):
    from utils.core.cpu_numerics import pin_cpu_numerics
    assert pin_cpu_numerics(), 'torch was imported before the pin'
    import torch  # noqa: F401  (what every demo imports, once, after the pin)
    import timm  # noqa: F401
    from utils.run import pipeline  # noqa: F401
    from utils.run.ptq import installed
    if installed('brevitas'):
        import brevitas.nn  # noqa: F401
    done = []
    for job in json.load(open(path)):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run(job)
        _, status, usage = os.wait4(pid, 0)
        done.append((os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime))
    with open(path + '.out', 'w') as f:
        json.dump(done, f)


if __name__ == '__main__':
    sys.path.insert(0, ROOT)
    main(sys.argv[1])
