"""The results store: one SQLite file per results folder (default `runs/bench/results.sqlite`).

Tables: `runs` (one row per recipe and grid node: labels, run id, status, resolved config,
versions, git hash, host, times, error), `metrics` (run, name, value) and `curves` (run,
source, step, name, value). Rows are keyed by (recipe, node), written with INSERT OR REPLACE
inside one transaction per run, so a rerun replaces its row and never duplicates it; values
are finite floats (NaN is never stored).

Concurrency: WAL mode (readers never block the writer) with a long busy timeout, and each write
retried while the database is locked, so several processes may write at once. WAL needs shared
memory that network filesystems do not give (SQLite's documentation), so on NFS/CIFS/Lustre/...
the store uses the rollback journal, whose file locks work across hosts. Every worker also
writes its record as JSON beside the grid (`<recipe>/records/<node>.json`); `sync` re-imports
them, so the store can always be rebuilt from the run folders.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    recipe TEXT NOT NULL, node TEXT NOT NULL, spec TEXT NOT NULL, kind TEXT NOT NULL,
    grp TEXT, variant TEXT, method TEXT, attack TEXT, attack_name TEXT, forget TEXT, concepts TEXT,
    seed INTEGER, depends TEXT, run_id TEXT, out TEXT, model TEXT,
    status TEXT NOT NULL, config TEXT, versions TEXT, git TEXT, host TEXT,
    started REAL, finished REAL, seconds REAL, error TEXT,
    PRIMARY KEY (recipe, node));
CREATE TABLE IF NOT EXISTS metrics (
    recipe TEXT NOT NULL, node TEXT NOT NULL, name TEXT NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (recipe, node, name));
CREATE TABLE IF NOT EXISTS curves (
    recipe TEXT NOT NULL, node TEXT NOT NULL, source TEXT NOT NULL, step INTEGER NOT NULL,
    name TEXT NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (recipe, node, source, step, name));
"""
RUN_COLUMNS = ("recipe", "node", "spec", "kind", "grp", "variant", "method", "attack", "attack_name", "forget",
               "concepts", "seed", "depends", "run_id", "out", "model", "status", "config", "versions", "git",
               "host", "started", "finished", "seconds", "error")
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "fuse.sshfs",
                       "9p", "afs", "ceph", "fuse.glusterfs", "glusterfs"}
BUSY_TIMEOUT_S = 120.0


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (the longest mount point prefix in /proc/mounts)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    target, best = str(path.resolve()), ("", "unknown")
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3:
            point = parts[1].replace("\\040", " ")
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
                best = (point, parts[2])
    return best[1]


class Store:
    """Open (and create) the store; every method opens its own short transaction."""

    def __init__(self, path: str | Path, journal: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fs = filesystem_type(self.path.parent)
        self.journal = journal or ("delete" if fs in NETWORK_FILESYSTEMS else "wal")
        self._retry(self._create)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        db.row_factory = sqlite3.Row
        return db

    def _create(self) -> None:
        db = self._connect()
        try:
            mode = db.execute(f"PRAGMA journal_mode = {self.journal}").fetchone()[0]
            if self.journal == "wal" and mode != "wal":
                raise sqlite3.OperationalError(f"could not enable WAL mode on {self.path} (got {mode})")
            db.executescript(SCHEMA)
        finally:
            db.close()

    @staticmethod
    def _retry(fn, attempts: int = 20):
        """Run `fn`, retrying while SQLite reports the database locked or busy."""
        for attempt in range(attempts):
            try:
                return fn()
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err) or attempt == attempts - 1:
                    raise
                time.sleep(min(0.05 * 2**attempt, 2.0))
        return None

    def _write(self, statements: list[tuple[str, Iterable]]) -> None:
        def run() -> None:
            db = self._connect()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    for sql, rows in statements:
                        db.executemany(sql, rows)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            finally:
                db.close()

        self._retry(run)

    # ---- writing -------------------------------------------------------------------------------

    def register(self, rows: list[dict[str, Any]]) -> None:
        """Add 'pending' rows for nodes the store does not know yet (or whose spec changed)."""
        known = {(r["node"], r["spec"]) for r in self.runs(rows[0]["recipe"])} if rows else set()
        fresh = [r for r in rows if (r["node"], r["spec"]) not in known]
        if not fresh:
            return
        placeholders = ", ".join("?" * len(RUN_COLUMNS))
        values = [tuple(_column(r, c, "pending" if c == "status" else None) for c in RUN_COLUMNS) for r in fresh]
        deletes = [(r["recipe"], r["node"]) for r in fresh]
        self._write([("DELETE FROM metrics WHERE recipe = ? AND node = ?", deletes),
                     ("DELETE FROM curves WHERE recipe = ? AND node = ?", deletes),
                     (f"INSERT OR REPLACE INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({placeholders})", values)])

    def record(self, record: dict[str, Any]) -> None:
        """One run's row, metrics and curves, replacing what the store held for that node."""
        key = (record["recipe"], record["node"])
        metrics = [(*key, name, float(v)) for name, v in (record.get("metrics") or {}).items() if _finite(v)]
        curves = [(*key, src, int(step), name, float(v)) for src, step, name, v in record.get("curves") or []
                  if _finite(v)]
        placeholders = ", ".join("?" * len(RUN_COLUMNS))
        row = tuple(_column(record, c) for c in RUN_COLUMNS)
        self._write([
            (f"INSERT OR REPLACE INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({placeholders})", [row]),
            ("DELETE FROM metrics WHERE recipe = ? AND node = ?", [key]),
            ("DELETE FROM curves WHERE recipe = ? AND node = ?", [key]),
            ("INSERT INTO metrics (recipe, node, name, value) VALUES (?, ?, ?, ?)", metrics),
            ("INSERT INTO curves (recipe, node, source, step, name, value) VALUES (?, ?, ?, ?, ?, ?)", curves),
        ])

    def mark(self, recipe: str, node: str, status: str, **fields: Any) -> None:
        """Update a node's status (and e.g. host, started, error) without touching its figures."""
        sets = ", ".join(f"{k} = ?" for k in ("status", *fields))
        self._write([(f"UPDATE runs SET {sets} WHERE recipe = ? AND node = ?",
                      [(status, *(_plain(v) for v in fields.values()), recipe, node)])])

    def sync(self, records_dir: Path) -> int:
        """Import every record file of a grid whose run the store does not hold as complete."""
        if not records_dir.is_dir():
            return 0
        count = 0
        for path in sorted(records_dir.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            current = self.run(record["recipe"], record["node"])
            if current is None or (current["status"] != "complete" and record.get("status") == "complete") or (
                    current["spec"] != record.get("spec") and record.get("status") == "complete"):
                self.record(record)
                count += 1
        return count

    # ---- reading -------------------------------------------------------------------------------

    def _read(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        def run() -> list[dict[str, Any]]:
            db = self._connect()
            try:
                return [dict(r) for r in db.execute(sql, args).fetchall()]
            finally:
                db.close()

        return self._retry(run)

    def runs(self, recipe: str | None = None) -> list[dict[str, Any]]:
        if recipe is None:
            return self._read("SELECT * FROM runs ORDER BY recipe, node")
        return self._read("SELECT * FROM runs WHERE recipe = ? ORDER BY node", (recipe,))

    def run(self, recipe: str, node: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM runs WHERE recipe = ? AND node = ?", (recipe, node))
        return rows[0] if rows else None

    def metrics(self, recipe: str) -> list[dict[str, Any]]:
        return self._read("SELECT node, name, value FROM metrics WHERE recipe = ?", (recipe,))

    def curves(self, recipe: str, source: str | None = None) -> list[dict[str, Any]]:
        if source is None:
            return self._read("SELECT node, source, step, name, value FROM curves WHERE recipe = ?", (recipe,))
        return self._read("SELECT node, source, step, name, value FROM curves WHERE recipe = ? AND source = ?",
                          (recipe, source))

    def complete(self, recipe: str) -> dict[str, str]:
        """node -> spec of the runs recorded as complete."""
        rows = self._read("SELECT node, spec FROM runs WHERE recipe = ? AND status = 'complete'", (recipe,))
        return {r["node"]: r["spec"] for r in rows}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value and \
        value not in (float("inf"), float("-inf"))


def _plain(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, float) and not _finite(value):
        return None
    return value


def _column(record: dict[str, Any], column: str, default: Any = None) -> Any:
    value = record.get(column, default)
    return default if value is None and default is not None else _plain(value)


def default_store_path(root: str | Path) -> Path:
    return Path(root) / "results.sqlite"


def host_name() -> str:
    return os.uname().nodename
