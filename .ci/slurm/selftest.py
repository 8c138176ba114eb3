#!/usr/bin/env python3
"""Self-check of the one-node SLURM cluster (.ci/slurm/start) through submitit.

    python .ci/slurm/selftest.py              # 2-task array + a refused sbatch (~2 s)
    python .ci/slurm/selftest.py --requeue    # + a job requeued by USR2 (~15 s more)

Exits 0 and prints "selftest: OK" when the cluster runs jobs; otherwise prints
what it saw (squeue, sinfo -R, the jobs' logs) and exits 1. Stdlib + submitit
only. It never calls sacct: it waits on the result pickles and on squeue, so
there is none of submitit's "Bypassing sacct error" noise either.
"""
import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import submitit
from submitit.core.utils import FailedJobError


def square(x):
    return {"x": x, "y": x * x, "job": os.environ.get("SLURM_JOB_ID"),
            "array": os.environ.get("SLURM_ARRAY_JOB_ID"), "task": os.environ.get("SLURM_ARRAY_TASK_ID")}


class CountStarts(submitit.helpers.Checkpointable):
    """Appends SLURM_RESTART_COUNT to a file at each start, then sleeps."""

    def __init__(self, path, sleep_s):
        self.path, self.sleep_s = path, sleep_s

    def __call__(self):
        with open(self.path, "a") as f:
            f.write(os.environ.get("SLURM_RESTART_COUNT", "0") + "\n")
        time.sleep(self.sleep_s)
        with open(self.path) as f:
            return f.read().split()


def sh(*cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    return (p.stdout + p.stderr).strip()


def live_ids(job_ids):
    """The ids among job_ids that squeue still lists (in any state)."""
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i"], capture_output=True, text=True).stdout
    return set(out.split()) & set(job_ids)


def wait_for(jobs, timeout_s):
    """Waits until each job wrote its result pickle; False when one vanished
    from squeue without one, or when timeout_s passed."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        missing = [j for j in jobs if not j.paths.result_pickle.exists()]
        if not missing:
            return True
        if not live_ids([j.job_id for j in missing]):
            time.sleep(2)  # the pickle may land just after the job leaves squeue
            if not all(j.paths.result_pickle.exists() for j in missing):
                return False
        time.sleep(0.2)
    return False


def report_failure(what, jobs):
    print(f"selftest: FAILED: {what}", file=sys.stderr)
    print("--- squeue -t all:\n" + sh("squeue", "-t", "all", "-r"), file=sys.stderr)
    print("--- sinfo -R:\n" + sh("sinfo", "-R"), file=sys.stderr)
    for j in jobs:
        for p in (j.paths.submission_file, j.paths.stdout, j.paths.stderr):
            if p.exists():
                print(f"--- {p}:\n{p.read_text()[-3000:]}", file=sys.stderr)
    ids = sorted({j.job_id.split("_")[0] for j in jobs})
    if ids:
        subprocess.run(["scancel", *ids])
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=120, help="seconds to wait for each check")
    ap.add_argument("--requeue", action="store_true", help="also check a USR2 requeue (~15 s)")
    ap.add_argument("--folder", default=None, help="submitit folder (default: a new temporary one)")
    args = ap.parse_args()

    logging.getLogger("submitit").setLevel(logging.ERROR)
    folder = args.folder or tempfile.mkdtemp(prefix="qwt-slurm-selftest-")
    print(f"selftest: submitit {submitit.__version__}, folder {folder}")
    print(sh("sinfo"))

    # 1. A 2-task array of a trivial function.
    ex = submitit.AutoExecutor(folder=os.path.join(folder, "%j"))
    if ex.cluster != "slurm":
        print(f"selftest: FAILED: submitit picked the '{ex.cluster}' executor (no srun on PATH?)", file=sys.stderr)
        sys.exit(1)
    ex.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=0.5, name="qwt-selftest",
                         slurm_array_parallelism=2)
    t0 = time.time()
    with ex.batch():
        jobs = [ex.submit(square, x) for x in (3, 4)]
    t_sub = time.time() - t0
    print(f"selftest: submitted array {[j.job_id for j in jobs]} in {t_sub:.2f}s")
    if not wait_for(jobs, args.timeout):
        report_failure(f"the array did not finish within {args.timeout:.0f}s", jobs)
    results = [j.result() for j in jobs]
    print(f"selftest: array done in {time.time() - t0:.1f}s: {json.dumps(results)}")
    array_id = jobs[0].job_id.split("_")[0]
    assert [r["y"] for r in results] == [9, 16], results
    assert [r["task"] for r in results] == ["0", "1"], results
    assert all(r["array"] == array_id for r in results), results

    # 2. sbatch refuses a partition that does not exist: FailedJobError, nothing queued.
    bad = submitit.AutoExecutor(folder=os.path.join(folder, "refused", "%j"))
    bad.update_parameters(timeout_min=1, slurm_partition="qwt-no-such-partition")
    print("selftest: submitting to a partition that does not exist; sbatch's two error lines on stderr are expected",
          flush=True)
    try:
        bad.submit(square, 1)
    except FailedJobError as e:
        msg = str(e)
        assert "Invalid partition name specified" in msg, msg
        print(f"selftest: refused as expected: {msg.splitlines()[-1]}")
    else:
        report_failure("sbatch accepted a job for a partition that does not exist", [])

    # 3. Optional: USR2 -> submitit checkpoints and requeues; the job runs again.
    if args.requeue:
        path = os.path.join(folder, "starts.txt")
        rex = submitit.AutoExecutor(folder=os.path.join(folder, "%j"))
        rex.update_parameters(timeout_min=5, slurm_signal_delay_s=30, name="qwt-selftest-requeue")
        job = rex.submit(CountStarts(path, 6))
        t0 = time.time()
        while not os.path.exists(path) and time.time() - t0 < args.timeout:
            time.sleep(0.2)
        time.sleep(1)  # let submitit install its signal handler
        subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
        if not wait_for([job], args.timeout):
            report_failure(f"the requeued job {job.job_id} did not finish within {args.timeout:.0f}s", [job])
        starts = job.result()
        print(f"selftest: requeue done in {time.time() - t0:.1f}s; SLURM_RESTART_COUNT per start: {starts}")
        assert starts == ["0", "1"], starts

    print("selftest: OK")


if __name__ == "__main__":
    main()
