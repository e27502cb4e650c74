"""Small torch-free file helpers: atomic writes (temp file, then rename) and the one JSON
writer of the package, which turns NaN and infinities into null so that every JSON file it
writes is valid JSON (Python's json module would write bare `NaN`, which no other parser reads)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename: a reader
    (or a process killed mid-write) sees the old file or the new one, never half of one. The
    temporary name holds the pid, so two processes never write the same temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, array-likes (numpy, torch) turned
    into lists, and other unknown objects into their string."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return json_safe(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return str(value)


def dump_json(data: Any, indent: int | None = 2) -> str:
    """JSON text of `data` with NaN/inf as null (see json_safe); never writes bare NaN."""
    return json.dumps(json_safe(data), indent=indent, allow_nan=False)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, dump_json(data))
