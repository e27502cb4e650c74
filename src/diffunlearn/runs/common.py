"""What every run kind shares: the Run object, the run directory's life (inspect, claim with
a lock, mark, skip or resume, mark diverged), the loop's settings from a typed config, the
run log, JSON and sample-grid writing, cost probes.

A run directory's life, in this order, so that bad input never leaves anything behind and a
run killed at any moment can be rerun:
1. inspect it (torch-free, writes nothing): new, resume or done; a directory holding anything
   else, another run, a diverged run, a corrupt checkpoint, or one in use is an error;
2. load what the run needs (model, evaluators, task): a folder that fails only at load fails here;
3. claim it: create it, take an OS lock on `.lock` inside it (flock: it dies with the process,
   so kill -9 never leaves a stale lock) recording pid, host and command, check it again under
   the lock, and write `run.json` (status `running`) atomically before anything else;
4. run; `run.json` becomes `complete` after the last file is written, or `diverged` (with the
   step and the last good checkpoint) when training produces NaN or infinite values.
A directory holding only `.lock` (a run killed between creating it and writing `run.json`)
counts as empty.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffunlearn.backends.model_dir import ModelDirError, read_safetensors_header
from diffunlearn.config import ConfigError, load_yaml, shown
from diffunlearn.engine.errors import TrainingDiverged
from diffunlearn.io import atomic_write_json, atomic_write_text, dump_json
from diffunlearn.runs.resolve import RunDirBusy, RunDirError, read_marker

log = logging.getLogger("diffunlearn")

MARKER = "run.json"
LOCK_FILE = ".lock"
LOCK_RETRIES = 5  # a probe (inspect_run_dir) holds a shared lock for microseconds; a run holds it for good


@dataclass
class Run:
    """A finished run: its directory, resolved config and metrics."""

    out: Path
    run_id: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    skipped: bool = False

    @property
    def model_dir(self) -> Path:
        return self.out / "model"


def run_or_skip(resolved, out: str | Path | None, kind: str, label: str, notify: Callable[[str], None] | None,
                threads: int | None, load: Callable[[], Any], execute: Callable[[Path, Any], Run],
                worker: Callable[[Path, Any], Run] | None = None) -> Run:
    """The life of a run directory (see the module docstring): inspect `out` (default: the
    resolved run's), skip it if done, else `load()` what the run needs, claim the directory and
    `execute(out, loaded)` in it while holding its lock. In a data-parallel launch the other
    processes neither claim nor write: they `load()` and run `worker(out, loaded)`, which trains
    alongside process 0 (engine/distributed.py)."""
    from diffunlearn.engine import distributed

    out_dir = Path(out) if out else resolved.default_out()
    if not distributed.is_main():
        if worker is None:
            raise ConfigError(f"{kind} runs do not train data-parallel; launch them as one process")
        if inspect_run_dir(out_dir, resolved.run_id, kind, probe_lock=False) == "done":
            return load_run(out_dir, skipped=True)
        set_threads(threads)
        return worker(out_dir, load())
    if inspect_run_dir(out_dir, resolved.run_id, kind) == "done":
        if (out_dir / "checkpoint").exists():  # killed between marking itself complete and cleaning up
            with claimed_dir(out_dir):
                remove_checkpoint(out_dir)
        _tell(notify, label, "done", out_dir)
        return load_run(out_dir, skipped=True)
    set_threads(threads)
    loaded = load()
    with claimed_run_dir(out_dir, resolved.run_id, kind) as state:
        _tell(notify, label, state, out_dir)
        if state == "done":  # another process finished it while this one was loading
            return load_run(out_dir, skipped=True)
        handler = attach_log(out_dir / "log.txt")
        try:
            return execute(out_dir, loaded)
        except TrainingDiverged as err:
            write_run_marker(out_dir, resolved.run_id, kind, "diverged", step=err.step,
                             checkpoint_step=err.checkpoint_step, reason=err.what)
            log.error("diverged at step %d: %s", err.step, err.what)
            kept = (f"its last good checkpoint (step {err.checkpoint_step}) is kept" if err.checkpoint_step
                    else "no checkpoint was reached")
            raise TrainingDiverged(err.step, err.what, err.checkpoint_step, message=(
                f"{kind} run {resolved.run_id} diverged at step {err.step} ({shown(err.what, 80)}); {out_dir} is "
                f"marked 'diverged' and {kept}; lower the learning rate and use another "
                "--out")) from None
        finally:
            detach_log(handler)


def _tell(notify: Callable[[str], None] | None, label: str, state: str, out: Path) -> None:
    if notify:
        verb = {"done": "is already complete", "resume": "resumes", "new": "starts"}[state]
        notify(f"{label} {verb} in {out}")


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


# ---- the run directory -----------------------------------------------------------------------

def inspect_run_dir(out: Path, run_id: str, kind: str, probe_lock: bool = True) -> str:
    """'new', 'resume' or 'done' for `out`; RunDirError if it holds anything else, is in use, or
    cannot be created. Torch-free; writes nothing."""
    if not out.exists():
        check_creatable(out)
        return "new"
    if not out.is_dir():
        raise RunDirError(f"output path {shown(str(out), 120)} exists and is not a directory; choose another --out")
    holder = lock_holder(out) if probe_lock else None
    if holder is not None:
        raise RunDirBusy(busy_message(out, holder))
    marker = out / MARKER
    if not marker.exists():
        try:
            names = [p.name for p in out.iterdir()]
        except OSError as err:
            raise RunDirError(f"cannot read output directory {shown(str(out), 120)}: {err.strerror}") from None
        if any(not is_scaffolding(name) for name in names):
            raise RunDirError(f"output directory {shown(str(out), 120)} is not empty and holds no diffunlearn run; "
                              "choose another --out")
        return "new"
    info = read_marker(marker)
    if info is None:
        raise RunDirError(f"output directory {shown(str(out), 120)} holds a corrupt run.json; choose another --out")
    if info.get("run_id") != run_id or info.get("kind") != kind:
        raise RunDirError(f"output directory {shown(str(out), 120)} already holds a different run "
                          f"({shown(str(info.get('kind')), 20)} {shown(str(info.get('run_id')), 20)}); "
                          "choose another --out")
    status = info.get("status")
    if status == "complete":
        return "done"
    if status == "diverged":
        raise RunDirError(f"output directory {shown(str(out), 120)} holds this run, which diverged at step "
                          f"{shown(str(info.get('step')), 12)}; the same settings diverge again: change them "
                          "(e.g. a lower learning rate) and choose another --out")
    if status != "running":
        raise RunDirError(f"output directory {shown(str(out), 120)} holds a run.json with an unknown status "
                          f"{shown(repr(status), 20)}; choose another --out")
    check_checkpoint(out / "checkpoint")
    return "resume"


def is_scaffolding(name: str) -> bool:
    """What a run killed before writing run.json may leave: its lock file and temporary files."""
    return name == LOCK_FILE or (name.startswith(".") and name.endswith(".tmp"))


def check_creatable(out: Path) -> None:
    """The nearest existing ancestor of `out` must be a writable directory."""
    ancestor = out.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RunDirError(f"cannot create output directory {shown(str(out), 120)}: {shown(str(ancestor), 80)} "
                          "is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot create output directory {shown(str(out), 120)}: {shown(str(ancestor), 80)} "
                          "is not writable")


def check_checkpoint(folder: Path) -> None:
    """A checkpoint a resumed run would load must be readable: its pointer names an intact
    safetensors file (torch-free; the loop re-reads it in full)."""
    pointer = folder / "ckpt.json"
    if not pointer.exists():
        return
    problem = None
    try:
        info = json.loads(pointer.read_bytes())
        name = info["file"] if isinstance(info, dict) else None
        if not isinstance(name, str) or not isinstance(info.get("step"), int):
            problem = "ckpt.json names no checkpoint"
        elif not (folder / name).is_file():
            problem = f"{shown(name, 40)} is missing"
        else:
            read_safetensors_header(folder / name)
    except (OSError, ValueError, KeyError):
        problem = "unreadable ckpt.json"
    except ModelDirError:
        problem = "truncated or corrupt tensors file"
    if problem:
        raise RunDirError(f"corrupt checkpoint in {shown(str(folder), 120)} ({problem}); delete that folder to "
                          "restart the run from scratch")


def write_run_marker(out: Path, run_id: str, kind: str, status: str, **details: Any) -> None:
    """run.json: the run's id, kind and status (running | complete | diverged), written atomically."""
    atomic_write_json(out / MARKER, {"run_id": run_id, "kind": kind, "status": status, **details})


def write_config(out: Path, resolved_dict: dict[str, Any]) -> None:
    from diffunlearn.config import dump_yaml

    atomic_write_text(out / "config.yaml", dump_yaml(resolved_dict))


@contextlib.contextmanager
def claimed_dir(out: Path) -> Iterator[None]:
    """Create `out` (and missing parents) and hold its lock inside the block. If this process
    cannot take the lock, it leaves everything as it found it."""
    created = _missing_dirs(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(out)
    except RunDirError:
        raise  # held by another process, which owns the directory
    except OSError as err:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                (folder / LOCK_FILE).unlink(missing_ok=True)
                folder.rmdir()
        raise RunDirError(f"cannot create output directory {shown(str(out), 120)}: "
                          f"{err.strerror or type(err).__name__}") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def claimed_run_dir(out: Path, run_id: str, kind: str) -> Iterator[str]:
    """Claim `out` for run `run_id`: create and lock it, inspect it again under the lock (another
    process may have finished or started it meanwhile), and mark a new run `running`."""
    with claimed_dir(out):
        state = inspect_run_dir(out, run_id, kind, probe_lock=False)
        if state == "new":
            write_run_marker(out, run_id, kind, "running")
        yield state


def _missing_dirs(out: Path) -> list[Path]:
    missing = []
    folder = out.absolute()
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return list(reversed(missing))


class RunLock:
    """An exclusive lock on `<dir>/.lock` (flock; msvcrt on Windows), released when closed or
    when the process dies, however it dies. The file records the holder for the error message
    a second command prints."""

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def acquire(cls, folder: Path) -> RunLock:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(LOCK_RETRIES):
            try:
                _lock(fd, exclusive=True)
                break
            except BlockingIOError:
                if attempt == LOCK_RETRIES - 1:
                    os.close(fd)
                    raise RunDirBusy(busy_message(folder, read_holder(folder))) from None
                time.sleep(0.02)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(["diffunlearn", *sys.argv[1:]])[:200]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, dump_json(holder, indent=None).encode(), 0)
        return cls(fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = -1


def _lock(fd: int, exclusive: bool) -> None:
    """Take the lock without waiting; BlockingIOError if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: an exclusive byte-range lock
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            raise BlockingIOError from None
        return
    fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)


def lock_holder(folder: Path) -> dict[str, Any] | None:
    """The holder recorded in `folder`'s lock file if a live process holds it, else None."""
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            import fcntl
        except ImportError:
            return None  # Windows: no shared probe; the claim itself reports a held lock
        try:
            _lock(fd, exclusive=False)
        except BlockingIOError:
            return read_holder(folder)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def read_holder(folder: Path) -> dict[str, Any]:
    try:
        holder = json.loads((folder / LOCK_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def busy_message(folder: Path, holder: dict[str, Any]) -> str:
    who = (f"pid {shown(str(holder.get('pid')), 12)} on {shown(str(holder.get('host')), 30)} since "
           f"{shown(str(holder.get('since')), 20)} (`{shown(str(holder.get('command')), 70)}`)"
           if holder.get("pid") else "another process")
    return (f"output directory {shown(str(folder), 80)} is in use by {who}; wait for it to finish or choose "
            "another --out")


def loop_config(c, steps: int, seed: int, progress: bool, description: str, **extra):
    """The shared loop's settings from a method's or an attack's TrainConfig."""
    from diffunlearn.engine.loop import LoopConfig

    return LoopConfig(steps=steps, lr=c.lr, optimizer=c.optimizer, weight_decay=c.weight_decay,
                      grad_clip=c.grad_clip, warmup=c.warmup, schedule=c.schedule, seed=seed,
                      log_every=c.log_every, checkpoint_every=c.checkpoint_every, progress=progress,
                      description=description, **extra)


@dataclass
class Judging:
    """What a run evaluates with, loaded once: the concept set, the evaluator (None: `none`) and
    the FID/KID feature extractor (None: no FID)."""

    concept_set: Any
    evaluator: Any
    fid_feature: Any

    @property
    def spec(self) -> str | None:
        return self.evaluator.spec if self.evaluator is not None else None


def load_judging(eval_cfg, concept_set) -> Judging:
    """The evaluator `eval.evaluator` names (default: the concept set's) and the FID features
    `eval.fid_features` names, for `concept_set`."""
    from safetensors import SafetensorError

    from diffunlearn.metrics.evaluators import effective_evaluator, load_evaluator, load_fid_features

    spec = effective_evaluator(eval_cfg, concept_set)
    try:
        evaluator = load_evaluator(spec, concept_set, eval_cfg)
        judging = Judging(concept_set, evaluator, load_fid_features(eval_cfg.fid_features, evaluator))
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        # resolve.check_evaluators read the headers; what still fails to load is the user's file
        raise ConfigError(f"cannot load the evaluators ({shown(str(spec), 120)}): {type(err).__name__}: "
                          f"{shown(str(err), 100)}") from None
    if evaluator is None:
        log.info("no evaluator (eval.evaluator=none): samples are generated, metrics are not computed")
    return judging


DEVICE_CHOICES = "cpu, cuda, cuda:N, mps or auto"


def check_device(device: str | None) -> None:
    """`--device`: None/auto, cpu, cuda, cuda:N or mps; the form is checked before torch loads."""
    import re

    if device is not None and not (isinstance(device, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,3})?", device)):
        raise ConfigError(f"bad value for --device: expected {DEVICE_CHOICES}, got {shown(repr(device))}")


def resolve_device(device: str | None = None):
    """The torch device a run uses: the one named, else CUDA when this torch build sees a GPU (in a
    data-parallel launch, the process's own: cuda:LOCAL_RANK), else the CPU. A named device this
    machine lacks is a one-line ConfigError."""
    import torch

    from diffunlearn.engine import distributed

    check_device(device)
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if distributed.launched() \
                else torch.device("cuda")
        return torch.device("cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ConfigError(f"--device {device}: CUDA is not available (torch {torch.__version__}, {build}); "
                              "install a CUDA build of torch (README 'Set-up') or use --device cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: Apple's MPS is not available here; use --device cpu")
    return chosen


def load_model(path: Path, allow_pickle: bool = False, device: str | None = None):
    """The model of a run on its device (T2IModel.from_pretrained turns load failures into
    ModelDirError)."""
    from diffunlearn.backends.diffusers_t2i import T2IModel

    return T2IModel.from_pretrained(path, device=str(resolve_device(device)), allow_pickle=allow_pickle)


def save_samples(path: Path, before, after) -> None:
    """Forget and retain prompts, before and after, the same seeds in each column."""
    from diffunlearn.metrics.grid import save_grid

    rows = []
    for role, label in (("forget-full", "forget"), ("forget-partial", "forget (partial)"), ("retain", "retain")):
        idx = [i for i, p in enumerate(before.plan) if p.role == role][:10]
        if idx:
            rows.append((f"{label}: before", before.images[idx]))
            rows.append((f"{label}: after", after.images[idx]))
    save_grid(path, rows)


# ---- small utilities -------------------------------------------------------------------------

def accelerator_peak() -> dict[str, float]:
    import torch

    if torch.cuda.is_available():
        return {"peak_cuda_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    return {}


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def write_json(path: Path, data: dict) -> None:
    """Atomically, with NaN and infinities as null (io.dump_json): always valid JSON."""
    atomic_write_json(path, data)


def load_run(out: Path, skipped: bool) -> Run:
    try:
        config = load_yaml(out / "config.yaml")
        metrics = json.loads((out / "metrics.json").read_bytes())
    except (ConfigError, OSError, ValueError):
        raise RunDirError(f"run directory {shown(str(out), 120)} is marked complete but its config.yaml or "
                          "metrics.json is missing or corrupt; choose another --out") from None
    if not isinstance(metrics, dict):
        raise RunDirError(f"run directory {shown(str(out), 120)} holds a corrupt metrics.json; choose another --out")
    return Run(out, config.get("run_id", ""), config, metrics, skipped=skipped)


def attach_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def detach_log(handler: logging.Handler) -> None:
    log.removeHandler(handler)
    handler.close()


def remove_checkpoint(out: Path) -> None:
    import shutil

    shutil.rmtree(out / "checkpoint", ignore_errors=True)


def make_task(resolved, original, progress: bool):
    """The run's UnlearningTask: its concept set, the set's image source (a generated source
    samples `original`, the model before any training, and caches by its hash), the anchor map."""
    from diffunlearn.data.images import image_source
    from diffunlearn.data.tasks import UnlearningTask, cache_dir

    t = resolved.task
    source = image_source(resolved.concept_set, t.seed, original, cache_dir(), progress)
    return UnlearningTask.create(t.forget, t.retain, t.images_per_prompt, t.seed, t.anchor_scheme,
                                 image_size=original.pixel_size, concept_set=resolved.concept_set, source=source)
