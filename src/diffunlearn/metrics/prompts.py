"""Prompt lists from CSV for evaluation (`eval.prompts=FILE.csv`), torch-free.

The I2P benchmark's files (and ESD's `unsafe-prompts4703.csv`) carry one prompt per row with
the seed and guidance scale it is to be sampled with: columns `prompt`, `evaluation_seed`,
`evaluation_guidance` (ESD `evalscripts/generate-images.py` reads these three). `sd_seed` and
`sd_guidance` (I2P's own columns) are read when the evaluation ones are absent; a plain
`prompt` column alone is enough. An optional `concept` column names the forget concept a row
probes (needed only when several concepts are forgotten).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffunlearn.config import ConfigError

SEED_COLUMNS = ("evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance")


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    seed: int | None = None  # None: the prompt-text seed of the protocol
    guidance: float | None = None  # None: the evaluation's guidance
    concept: str | None = None


def read_prompt_csv(path: str | Path) -> list[PromptRow]:
    """The rows of a prompt CSV; ConfigError (one line, with the row number) for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"eval.prompts: file not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if "prompt" not in columns:
                raise ConfigError(f"eval.prompts: {path} has no 'prompt' column (columns: {', '.join(columns)})")
            seed_col = next((c for c in SEED_COLUMNS if c in columns), None)
            guidance_col = next((c for c in GUIDANCE_COLUMNS if c in columns), None)
            rows = [_row(r, n, path, seed_col, guidance_col) for n, r in enumerate(reader, 2)]
    except (csv.Error, UnicodeDecodeError) as err:
        raise ConfigError(f"eval.prompts: malformed CSV {path}: {err}") from None
    rows = [r for r in rows if r is not None]
    if not rows:
        raise ConfigError(f"eval.prompts: {path} has no prompts")
    return rows


def _row(row: dict, line: int, path: Path, seed_col: str | None, guidance_col: str | None) -> PromptRow | None:
    prompt = (row.get("prompt") or "").strip()
    if not prompt:
        return None
    seed = _number(row, seed_col, line, path, int)
    guidance = _number(row, guidance_col, line, path, float)
    concept = (row.get("concept") or "").strip() or None
    return PromptRow(prompt, seed, guidance, concept)


def _number(row: dict, column: str | None, line: int, path: Path, kind: type):
    text = (row.get(column) or "").strip() if column else ""
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"eval.prompts: {path} line {line}: {column} is not a number ({text!r})") from None
    if kind is int:
        if value != int(value) or value < 0:
            raise ConfigError(f"eval.prompts: {path} line {line}: {column} must be a non-negative integer")
        return int(value)
    if value < 0:
        raise ConfigError(f"eval.prompts: {path} line {line}: {column} must be >= 0")
    return value


def assign_concepts(rows: Sequence[PromptRow], forget: Sequence[str]) -> list[str]:
    """The forget concept each row probes: its `concept` column, else the only forget concept."""
    out = []
    for n, row in enumerate(rows):
        concept = row.concept
        if concept is None:
            if len(forget) != 1:
                raise ConfigError(f"eval.prompts: with several forget concepts ({', '.join(forget)}) every row needs "
                                  f"a 'concept' column naming one of them (row {n + 1} has none)")
            concept = forget[0]
        elif concept not in forget:
            raise ConfigError(f"eval.prompts: row {n + 1} names concept '{concept}', which is not forgotten "
                              f"(forget: {', '.join(forget)})")
        out.append(concept)
    return out
