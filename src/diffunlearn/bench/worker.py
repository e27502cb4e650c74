"""The one entry point every executor calls to run one grid node.

    python -m diffunlearn.bench.worker SPEC.json      # local processes
    run_node(spec)                                    # in-process: Ray tasks, submitit jobs

It takes the node's lock (`<out>.lock`, so two processes or hosts never run the same run
directory at once), runs the node through the public API (`diffunlearn.erase`, `.attack`,
`.evaluate`; finished runs are skipped, interrupted ones resume), reads its figures, writes
the record file beside the grid and records it in the store. Exit status: 0 done, 1 failed
(the error is recorded), 3 diverged (training produced NaN/inf: `run.json` says `diverged`, and
the same settings would diverge again, so the runner does not retry it), 75 the node is being
run elsewhere (its lock, or its run directory's lock, is held: the runner comes back later).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffunlearn.engine.errors import TrainingDiverged
from diffunlearn.runs.resolve import RunDirBusy

EXIT_DIVERGED = 3  # as the command line's
EXIT_BUSY = 75
FINAL = ("complete", "failed", "diverged")


class NodeBusy(RuntimeError):
    """Another process (or host) holds this node's lock."""


@contextmanager
def node_lock(out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_name(out.name + ".lock")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NodeBusy(f"{out} is being run by another process") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def record_path(spec: dict[str, Any]) -> Path:
    return Path(spec["records"]) / (spec["node"].replace("/", "__") + ".json")


def run_node(spec: dict[str, Any], raise_on_failure: bool = True) -> dict[str, Any]:
    """Run one node and return its record (status complete, failed or diverged). Raises NodeBusy
    when the node, or its run directory, is locked elsewhere, and (with `raise_on_failure`)
    RuntimeError after recording a failure, so that Ray and submitit see the task fail and retry
    it. A diverged run is returned, never raised: retrying it would diverge again."""
    from diffunlearn.bench.store import Store, host_name

    out = Path(spec["out"])
    store = Store(spec["store"]) if spec.get("store") else None
    record = {k: v for k, v in spec.items() if k not in ("overrides", "store", "records", "threads", "est_seconds",
                                                         "attack_model", "attack_forget", "method_name",
                                                         "task_options")}
    with node_lock(out):
        started, cpu_start = time.time(), _cpu_seconds()
        record.update(host=host_name(), started=started, status="running")
        if store is not None:
            store.mark(spec["recipe"], spec["node"], "running", host=record["host"], started=started, spec=spec["spec"])
        try:
            _refuse_diverged(out)
            run_id, config = _execute(spec, out)
            from diffunlearn.bench.extract import curves, run_figures

            figures = run_figures(out, spec["kind"])
            finished = time.time()
            figures["seconds"] = round(finished - started, 2)
            figures["cpu_seconds"] = round(_cpu_seconds() - cpu_start, 2)
            record.update(status="complete", run_id=run_id or spec.get("run_id"), config=config,
                          finished=finished, seconds=figures["seconds"], metrics=figures,
                          curves=curves(out, spec["kind"]), error=None)
        except RunDirBusy as err:  # a command outside the grid works in the run directory right now
            if store is not None:
                store.mark(spec["recipe"], spec["node"], "pending")
            raise NodeBusy(str(err)) from None
        except TrainingDiverged as err:
            record.update(status="diverged", finished=time.time(), seconds=round(time.time() - started, 2),
                          error=f"TrainingDiverged: {err}"[:2000], metrics={}, curves=[])
        except Exception as err:  # recorded, then re-raised for the executor's retry policy
            record.update(status="failed", finished=time.time(), seconds=round(time.time() - started, 2),
                          error=f"{type(err).__name__}: {err}"[:2000], metrics={}, curves=[],
                          traceback=traceback.format_exc()[-4000:])
        _save_record(spec, record)
        if store is not None:
            store.record(record)
    if record["status"] == "failed" and raise_on_failure:
        raise RuntimeError(f"{spec['node']}: {record['error']}")
    return record


def refresh_record(spec: dict[str, Any]) -> bool:
    """Re-read a finished node's figures and curves from its run directory into its record file
    and the store (what an upgrade of `bench/extract.py` adds shows for runs made before it);
    the run's times are kept. False when the node has no complete record or no directory."""
    from diffunlearn.bench.extract import curves, run_figures
    from diffunlearn.bench.store import Store

    path, out = record_path(spec), Path(spec["out"])
    if not path.is_file() or not out.is_dir():
        return False
    record = json.loads(path.read_text())
    if record.get("status") != "complete":
        return False
    kept = {k: v for k, v in (record.get("metrics") or {}).items() if k in ("seconds", "cpu_seconds")}
    record.update(metrics=run_figures(out, spec["kind"]) | kept, curves=curves(out, spec["kind"]))
    _save_record(spec, record)
    Store(spec["store"]).record(record)
    return True


def _refuse_diverged(out: Path) -> None:
    """A run directory marked `diverged` (by this grid earlier, or by a command) fails at once as
    diverged, with the step it diverged at, rather than as a run directory error."""
    from diffunlearn.runs.resolve import read_marker

    info = read_marker(out / "run.json") if (out / "run.json").is_file() else None
    if info and info.get("status") == "diverged":
        step = info.get("step")
        raise TrainingDiverged(step if isinstance(step, int) else 0, str(info.get("reason", "NaN or inf")),
                               info.get("checkpoint_step"), message=(
                                   f"{out} is marked 'diverged' (step {step}: {info.get('reason')}); the same settings "
                                   "diverge again: change them in the recipe (e.g. a lower method.lr)"))


def _cpu_seconds() -> float:
    """CPU time (user + system, all threads) of this process so far: the run's cost without the
    waiting a busy machine adds to its wall time."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _execute(spec: dict[str, Any], out: Path) -> tuple[str | None, dict | None]:
    import diffunlearn

    threads = spec.get("threads")
    kind, overrides = spec["kind"], list(spec.get("overrides") or [])
    task = spec.get("task_options") or {}  # the recipe's concept set: concepts, domain, anchor
    if kind == "erase":
        run = diffunlearn.erase(spec.get("method_name") or spec["method"], spec["concepts"], model=spec.get("model"),
                                out=out, overrides=overrides, threads=threads, progress=False, **task)
        return run.run_id, run.config
    if kind == "attack":
        run = diffunlearn.attack(spec["attack_name"], spec["attack_model"], forget=spec.get("attack_forget"),
                                 out=out, overrides=overrides, threads=threads, progress=False, **task)
        return run.run_id, run.config
    if kind == "evaluate":
        if (out / "evaluation.json").is_file():
            metrics = json.loads((out / "evaluation.json").read_text())
        else:
            metrics = diffunlearn.evaluate(spec.get("model"), spec["concepts"], out=out, overrides=overrides,
                                           threads=threads, progress=False, concepts=task.get("concepts"),
                                           domain=task.get("domain"))
        return spec.get("run_id"), {"model": metrics.get("model"), "eval": metrics.get("eval")}
    raise ValueError(f"unknown node kind {kind!r}")


def _save_record(spec: dict[str, Any], record: dict[str, Any]) -> None:
    from diffunlearn.io import atomic_write_text

    path = record_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, default=str))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m diffunlearn.bench.worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    try:
        record = run_node(spec, raise_on_failure=False)
    except NodeBusy as err:
        print(f"busy: {err}", file=sys.stderr)
        return EXIT_BUSY
    if record["status"] == "diverged":
        print(f"diverged: {record['error']}", file=sys.stderr)
        return EXIT_DIVERGED
    if record["status"] != "complete":
        print(f"failed: {record['error']}", file=sys.stderr)
        print(record.get("traceback", ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
