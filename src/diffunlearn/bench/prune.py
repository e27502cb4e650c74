"""Run directories a recipe's grid no longer names, and their removal (`diffunlearn bench RECIPE --prune`).

A run directory is keyed by its resolved spec (`runs/resolve.py`), so when a profile, a recipe
setting or the package changes, the next grid writes new directories beside the old ones, which
nothing reads again. A directory under `<root>/<recipe>/runs` is kept when the results store
records it for a node of the recipe (whatever model, concept set or protocol it ran with: the
store's rows are those of every grid run into this root), or when a node of the recipe's current
expansion names it under any of its protocols; every other one is an orphan. An erase directory
that is kept keeps only the attack directories under it that are kept too.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Orphan:
    path: Path
    bytes: int


def orphaned_runs(recipe_name: str, root: Path, named: Iterable[Path]) -> list[Orphan]:
    """The run directories under `<root>/<recipe_name>/runs` that neither the store nor `named`
    (the current expansion's run directories) names, largest first."""
    from diffunlearn.bench.store import Store, default_store_path

    base = root / recipe_name / "runs"
    if not base.is_dir():
        return []
    kept = {Path(p).resolve() for p in named}
    if default_store_path(root).is_file():
        kept |= {Path(r["out"]).resolve() for r in Store(default_store_path(root)).runs(recipe_name) if r["out"]}
    orphans = []
    for erase_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        if erase_dir.resolve() in kept:
            attacks = erase_dir / "attacks"
            candidates = sorted(p for p in attacks.iterdir() if p.is_dir()) if attacks.is_dir() else []
        elif any(erase_dir.resolve() in k.parents for k in kept):
            continue  # an attack is kept whose erase run is not recorded: keep the whole tree
        else:
            candidates = [erase_dir]
        orphans += [Orphan(p, _size(p)) for p in candidates if p.resolve() not in kept]
    return sorted(orphans, key=lambda o: (-o.bytes, str(o.path)))


def remove(orphans: Iterable[Orphan]) -> int:
    """Delete each orphan and the lock file the grid kept beside it; the bytes freed."""
    freed = 0
    for orphan in orphans:
        shutil.rmtree(orphan.path)
        orphan.path.with_name(orphan.path.name + ".lock").unlink(missing_ok=True)
        freed += orphan.bytes
    return freed


def _size(path: Path) -> int:
    """The bytes only this directory holds: a run's model files hard-linked to its base model's
    (`save_pretrained(changed_only=True)`) free nothing when it goes."""
    sizes = (f.lstat() for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return sum(st.st_size for st in sizes if st.st_nlink == 1)
