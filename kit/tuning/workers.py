"""``./run.sh tune ... --gpus 0,1`` / ``--workers N``: one tune worker per GPU on one host.

The launcher creates the studies once (what ``--create-only`` does: Optuna's tables, the
study, and for the features objective the embedding cache), then starts the workers, each a
``python -m kit.tuning.workers --worker`` process running the same ``tune`` command with its
own ``CUDA_VISIBLE_DEVICES``, all on one storage (the default SQLite file, or ``--storage``).
Optuna hands out the trials; ``--trials`` stays the study's total over every worker. Each
output line comes back prefixed with its worker (``[w1 gpu1] ...``). When a worker fails, the
launcher says which, with its exit code, stops the others and exits 2; a rerun of the same
command continues the study.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kit.process import run_for_user
from kit.tuning.job import TuneJob
from kit.tuning.storage import default_url
from kit.tuning.tune import run_job
from kit.utils import KitError

log = logging.getLogger(__name__)

STOP_GRACE_S = 20  # after SIGINT, how long a stopped worker may take to mark its trial failed


@dataclass
class Worker:
    """One process to run: a label for its output lines, its command and extra environment."""

    label: str
    cmd: list[str]
    env: dict = field(default_factory=dict)


def visible_gpus() -> list[str]:
    """The GPU ids this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    if current is not None and current.strip():
        # Already restricted: hand out those entries, not 0..n-1 (which would be renumbered).
        return [g.strip() for g in current.split(",") if g.strip()][:n]
    return [str(i) for i in range(n)]


def parse_gpus(spec: str | None) -> list[str] | None:
    """``--gpus``: ``all``, or a comma-separated list of ids (``0,1`` or UUIDs)."""
    if spec is None:
        return None
    if spec.strip().lower() == "all":
        gpus = visible_gpus()
        if not gpus:
            raise KitError("tune --gpus all: no CUDA GPU is visible here; use --workers N for "
                           "CPU workers, or run on a machine with GPUs")
        return gpus
    gpus = [g.strip() for g in spec.split(",")]
    if not gpus or any(not g for g in gpus) or len(set(gpus)) != len(gpus):
        raise KitError(f"tune --gpus {spec!r}: give distinct GPU ids separated by commas "
                       "(e.g. --gpus 0,1) or 'all'")
    return gpus


def assign(workers: int | None, gpus: list[str] | None) -> list[str | None]:
    """The GPU of each worker (None = CPU): one per listed GPU, or ``workers`` round-robin
    over them (``--workers 4 --gpus 0,1``: two per GPU)."""
    if workers is not None and workers < 1:
        raise KitError(f"tune --workers {workers}: give 1 or more")
    if gpus is None:
        visible = visible_gpus()
        if workers is None:
            raise KitError("tune: --workers N or --gpus LIST starts several workers")
        gpus = visible or None
    if gpus is None:
        return [None] * workers
    n = len(gpus) if workers is None else workers
    return [gpus[i % len(gpus)] for i in range(n)]


def worker_env(gpu: str | None, n_workers: int) -> dict:
    """Environment of one worker: its GPU, or on CPU an equal share of the cores."""
    if gpu is not None:
        return {"CUDA_VISIBLE_DEVICES": gpu}
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # N workers each with every core would oversubscribe the CPU (torch's default).
    return {"OMP_NUM_THREADS": str(max(1, int(cores or 1) // n_workers))}


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (killed: out of memory?)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


def run_processes(workers: list[Worker], out=None, poll_s: float = 0.2) -> None:
    """Run ``workers`` at once, each output line prefixed ``[label]``; all must succeed.

    Raises
    ------
    KitError
        As soon as one fails (the others are stopped first: SIGINT, then SIGKILL after
        :data:`STOP_GRACE_S`), naming it and its exit code.
    """
    out = out or sys.stdout
    lock = threading.Lock()
    width = max(len(w.label) for w in workers)
    procs, threads = [], []

    def pump(proc, label):
        for line in proc.stdout:
            with lock:
                out.write(f"[{label:<{width}}] {line.rstrip()}\n")
                out.flush()

    try:
        for w in workers:
            proc = subprocess.Popen(w.cmd, env={**os.environ, **w.env}, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    errors="replace")
            procs.append(proc)
            t = threading.Thread(target=pump, args=(proc, w.label), daemon=True)
            t.start()
            threads.append(t)
        failed = None
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if failed is None:
                time.sleep(poll_s)
        if failed is None:
            failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
    except KeyboardInterrupt:
        _stop(procs)
        raise
    if failed is not None:
        running = [p for p in procs if p.poll() is None]
        if running:
            with lock:
                out.write(f"tune: worker {workers[failed].label} "
                          f"{_describe_exit(procs[failed].returncode)}; stopping the other "
                          f"{len(running)}\n")
                out.flush()
        _stop(procs)
    for t in threads:
        t.join(timeout=5)
    if failed is not None:
        w = workers[failed]
        raise KitError(f"tune: worker {w.label} {_describe_exit(procs[failed].returncode)} "
                       f"(its last lines above, prefixed [{w.label}]); the others were stopped. "
                       "Fix the cause and rerun the same command: the study continues")


def _stop(procs) -> None:
    """SIGINT (the kit stops after marking the running trial failed), then SIGKILL."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# --------------------------------------------------------------------------- tune
def _payload(job: TuneJob, storage: str, **changes) -> str:
    """The tune stage's job as JSON, for a worker (every worker on the one ``storage``)."""
    return job.to_json(cfg={**job.cfg, "storage": storage}, **changes)


def launch(job: TuneJob, workers: int | None, gpus_spec: str | None) -> int:
    """``./run.sh tune`` with ``--workers``/``--gpus``: create the studies, run the workers.

    ``job`` is the tune stage's arguments (:class:`kit.tuning.job.TuneJob`), resolved once by
    the command; every worker runs that stage with them.
    """
    if job.estimate:
        raise KitError("tune --estimate runs in one process; leave out --workers/--gpus")
    if job.create_only:
        raise KitError("tune --create-only creates the studies once; leave out --workers/--gpus "
                       "(the launcher does this step itself before starting them)")
    paths = job.paths
    gpus = assign(workers, parse_gpus(gpus_spec))
    # An explicit storage makes each worker seed its sampler with its own process id too
    # (kit.tuning.study.make_sampler), so workers that start together do not draw the same trials.
    storage = job.cfg["storage"] or default_url(paths)
    where = ", ".join(f"w{i}: {'GPU ' + g if g is not None else 'CPU'}"
                      for i, g in enumerate(gpus))
    log.info(f"tune: {len(gpus)} workers on one storage ({where})")
    here = str(Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    base = [sys.executable, "-m", "kit.tuning.workers", "--worker"]
    first = gpus[0]
    create = Worker("create", base + [_payload(job, storage=storage, create_only=True)],
                    {"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", **worker_env(first, 1)})
    run_processes([create])
    procs = []
    for i, gpu in enumerate(gpus):
        label = f"w{i} {'gpu' + gpu if gpu is not None else 'cpu'}"
        env = {"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", "KIT_TUNE_WORKER": str(i),
               **worker_env(gpu, len(gpus))}
        procs.append(Worker(label, base + [_payload(job, storage=storage)], env))
    t0 = time.perf_counter()
    run_processes(procs)
    log.info(f"tune: {len(procs)} workers done in {time.perf_counter() - t0:.0f} s; each "
             "backbone's best.yaml holds the study's best")
    return 0


def _worker_main(payload: str) -> int:
    """One worker: the tune stage with the launcher's resolved arguments."""
    run_job(TuneJob.from_json(payload))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m kit.tuning.workers --worker JSON (started by ./run.sh tune "
              "--workers/--gpus)", file=sys.stderr)
        return 2
    return run_for_user(lambda: _worker_main(argv[1]),
                        "interrupted: the running trial is marked failed; rerun to continue")


if __name__ == "__main__":
    sys.exit(main())
