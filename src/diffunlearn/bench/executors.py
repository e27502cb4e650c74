"""Executors: where grid nodes run. Each takes a node's spec (`submit`) and reports finished
nodes as (node, status) with status complete / failed / diverged / busy (`poll`); all of them
call the one worker entry point (`bench/worker.py`).

- `local`: one `python -m diffunlearn.bench.worker SPEC.json` process per node. Each child
  asks the kernel to kill it when the runner dies (PR_SET_PDEATHSIG), so a killed runner
  leaves no orphan writing to a run directory; a rerun resumes the interrupted runs.
- `ray`: Ray tasks (`ray.init(address)`; a local cluster when no address), one task per node
  with `num_cpus` = the run's threads and `num_gpus` as asked, failed tasks retried by Ray.
- `slurm`: Slurm jobs through submitit (`AutoExecutor`; `cluster="local"` runs submitit's
  local executor, which the tests use), failed jobs resubmitted by the runner.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from diffunlearn.bench.worker import EXIT_BUSY, EXIT_DIVERGED, NodeBusy

EXECUTORS = ("local", "ray", "slurm")
EXIT_STATUS = {0: "complete", EXIT_BUSY: "busy", EXIT_DIVERGED: "diverged"}  # the worker's exit codes


class MissingExtra(RuntimeError):
    """An optional dependency (the `ray` or `slurm` extra) is not installed."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setpgrp()  # its own process group: a ctrl-C in the terminal reaches the runner only


class LocalExecutor:
    def __init__(self, folder: Path, threads: int | None = None):
        self.folder = Path(folder)
        self.threads = threads
        self.procs: dict[str, tuple[subprocess.Popen, Any]] = {}

    def submit(self, spec: dict[str, Any]) -> None:
        from diffunlearn.bench.grid import write_spec

        path = write_spec(spec, self.folder / "specs")
        log_dir = self.folder / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log = open(log_dir / (spec["node"].replace("/", "__") + ".log"), "a")  # noqa: SIM115 (closed in poll)
        env = dict(os.environ)
        if spec.get("threads"):
            env["OMP_NUM_THREADS"] = str(spec["threads"])
        env["PYTHONPATH"] = os.pathsep.join([p for p in (_source_root(), env.get("PYTHONPATH")) if p])
        proc = subprocess.Popen([sys.executable, "-m", "diffunlearn.bench.worker", str(path)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        self.procs[spec["node"]] = (proc, log)

    def poll(self, timeout: float = 0.5) -> list[tuple[str, str]]:
        import time

        deadline = time.time() + timeout
        while True:
            finished = []
            for node, (proc, log) in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del self.procs[node]
                finished.append((node, EXIT_STATUS.get(code, "failed")))
            if finished or time.time() >= deadline or not self.procs:
                return finished
            time.sleep(min(0.1, timeout))

    def shutdown(self) -> None:
        for proc, log in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()
        self.procs.clear()


def _source_root() -> str:
    """The folder holding this diffunlearn package, so a child imports the same code."""
    return str(Path(__file__).resolve().parents[2])


def _task(spec: dict[str, Any]) -> dict[str, Any]:
    """A Ray task or submitit job: the worker in-process; 'busy' instead of an exception when
    the node is locked elsewhere, and a diverged run returned as such (neither is a failure to
    retry)."""
    from diffunlearn.bench.worker import run_node

    try:
        record = run_node(spec)
    except NodeBusy:
        return {"node": spec["node"], "status": "busy"}
    return {"node": record["node"], "status": record["status"]}


class RayExecutor:
    def __init__(self, address: str | None = None, threads: int | None = None, gpus: float = 0.0,
                 retries: int = 2, local_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise MissingExtra("the ray executor needs the 'ray' extra: pip install 'diffunlearn[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
                [p for p in (_source_root(), os.environ.get("PYTHONPATH")) if p])}}
            kwargs: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": False,
                                      "include_dashboard": False}
            if address:
                ray.init(address=address, **kwargs)
            else:
                # a local cluster: CPUs for the jobs, a small object store (records are small)
                ray.init(num_cpus=local_cpus, object_store_memory=200 * 2**20, **kwargs)
        self.remote = ray.remote(_task).options(num_cpus=threads or 1, num_gpus=gpus, max_retries=retries,
                                                retry_exceptions=True)
        self.pending: dict[Any, str] = {}

    def submit(self, spec: dict[str, Any]) -> None:
        self.pending[self.remote.remote(spec)] = spec["node"]

    def poll(self, timeout: float = 0.5) -> list[tuple[str, str]]:
        if not self.pending:
            return []
        ready, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        out = []
        for ref in ready:
            node = self.pending.pop(ref)
            try:
                out.append((node, self.ray.get(ref)["status"]))
            except Exception:  # the task failed after Ray's retries; the worker recorded the error
                out.append((node, "failed"))
        return out

    def shutdown(self) -> None:
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        self.pending.clear()


class SlurmExecutor:
    def __init__(self, folder: Path, threads: int | None = None, gpus: int = 0, cluster: str | None = None,
                 timeout_min: int = 240, partition: str | None = None):
        try:
            import submitit
        except ImportError:
            raise MissingExtra("the slurm executor needs the 'slurm' extra: pip install 'diffunlearn[slurm]'"
                               ) from None
        self.executor = submitit.AutoExecutor(folder=str(Path(folder) / "submitit"), cluster=cluster)
        params: dict[str, Any] = {"timeout_min": timeout_min, "cpus_per_task": threads or 1, "nodes": 1,
                                  "tasks_per_node": 1}
        if gpus:
            params["gpus_per_node"] = gpus
        if partition:
            params["slurm_partition"] = partition
        self.executor.update_parameters(**params)
        self.jobs: dict[str, Any] = {}

    def submit(self, spec: dict[str, Any]) -> None:
        self.jobs[spec["node"]] = self.executor.submit(_task, spec)

    def poll(self, timeout: float = 0.5) -> list[tuple[str, str]]:
        import time

        deadline = time.time() + timeout
        while True:
            out = []
            for node, job in list(self.jobs.items()):
                if not job.done():
                    continue
                del self.jobs[node]
                try:
                    out.append((node, job.result()["status"]))
                except Exception:  # the job raised (recorded by the worker) or was lost
                    out.append((node, "failed"))
            if out or time.time() >= deadline or not self.jobs:
                return out
            time.sleep(min(0.2, timeout))

    def shutdown(self) -> None:
        for job in self.jobs.values():
            try:
                job.cancel(check=False)
            except Exception:  # already finished or gone
                pass
        self.jobs.clear()


def make_executor(name: str, folder: Path, jobs: int, threads: int | None, address: str | None = None,
                  gpus: float = 0.0, retries: int = 1, cluster: str | None = None, partition: str | None = None):
    if name == "local":
        return LocalExecutor(folder, threads)
    if name == "ray":
        return RayExecutor(address, threads, gpus, retries, local_cpus=None if address else jobs * (threads or 1))
    if name == "slurm":
        return SlurmExecutor(folder, threads, int(gpus), cluster, partition=partition)
    from diffunlearn.config import ConfigError

    raise ConfigError(f"unknown executor '{name}'; valid: {', '.join(EXECUTORS)}")
