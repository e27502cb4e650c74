"""Verdicts on a recipe's claims, computed from the results, never written by hand.

Every figure is summarised over seeds as a mean with a two-sided 95% Student-t interval,
mean +/- t(0.975, n-1) * s / sqrt(n) (s: the sample standard deviation). A seedless control
(the original model, evaluated once: its evaluation is deterministic) is an exact point; any
other figure seen once has no interval, and every comparison with it is inconclusive.

Claim kinds (`recipe.Claim`); a comparison of A over B, on the rows a selection picks:
- `greater` / `less`: subject vs other. Holds when the intervals separate in the claimed
  direction (A.lo > B.hi), fails when they separate the other way or coincide as exact points
  (A.hi <= B.lo), is inconclusive when they overlap.
- `best` / `worst`: subject vs each value of `by` among `among` (the subject's own excluded):
  holds when it holds against every one, fails when it fails against any, else inconclusive.
- `at_least` / `at_most`: subject vs the constant `value`: holds when the whole interval is on
  the claimed side (lo >= value), fails when it is wholly on the other (hi < value).
- `rises` / `falls`: the change from `other` (matched by seed) or from `from_metric` (same
  runs) to the subject: the t-interval of the per-seed differences; holds when it is above 0,
  fails when it is at or below 0 (no rise), else inconclusive.
- `same`: a finding of no effect, tested as equivalence within a margin: the interval of the
  same per-seed change lies within [-value, value] (holds), wholly outside it (fails), or
  across its edge (inconclusive).
A share of the forget generations (AR_*, forget accuracy, UA, erase ACC, resurgence) moves in
steps of its resolution, 100 / the forget images (`AR_resolution` of each run): a comparison of
such figures whose means differ by less than one step is inconclusive whatever the intervals say
(a difference inside one generation is noise), and its figures say the resolution. The interval
of such a share (all but resurgence, a difference) is never narrower than the 95% Wilson score
interval of the generations pooled over its runs: seeds that agree (three runs each seeing 1 of
22 generations) give a t-interval of width 0, though 3 of 66 generations cannot tell 4.5% from
10%; the figures say when the floor widened it. Such an interval is cut to [0, 100], where every
share lies. IRA and CRA, shares of the retain generations (averaged over domains where the
forget set spans two; [003]'s preserve ACC is IRA), get the same resolution and floor from the
retain images each judged (`IRA_images`, `CRA_images`: recorded by evaluations since
2026-12-07, known for the canvas evaluator's older ones; other older runs get neither).
`per` splits the claim into one verdict per value of those columns; the claim holds when
every slice holds, fails when any slice fails, else is inconclusive. A slice without runs
yet says `no data`. All rows a selection picks in a slice are pooled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from diffunlearn.bench.recipe import SELECTION_COLUMNS, Claim, Recipe, Selection

if TYPE_CHECKING:
    import pandas as pd

HOLDS, FAILS, INCONCLUSIVE, NO_DATA = "holds", "fails", "inconclusive", "no data"

# two-sided 95% quantiles of Student's t, t(0.975, df)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile(df: int) -> float:
    """t(0.975, df): the table up to 30, then the Cornish-Fisher expansion z + (z^3 + z) / (4 df)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df)


@dataclass(frozen=True)
class Interval:
    """Mean and 95% t-interval of `n` values; lo/hi None when there is no interval (one value)."""

    mean: float
    lo: float | None
    hi: float | None
    n: int
    generations: int | None = None  # set when the Wilson interval of this many generations widened it

    @classmethod
    def of(cls, values: Iterable[float], exact: bool = False) -> Interval:
        xs = [float(v) for v in values]
        if not xs:
            raise ValueError("no values")
        n, mean = len(xs), sum(xs) / len(xs)
        if n == 1:
            return cls(mean, mean, mean, 1) if exact else cls(mean, None, None, 1)
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
        half = t_quantile(n - 1) * sd / math.sqrt(n)
        return cls(mean, mean - half, mean + half, n)

    @property
    def known(self) -> bool:
        return self.lo is not None

    def text(self) -> str:
        """'98.3 [96.1, 100.5] (n=3)'; a seedless control is 'exact', a single value has no interval."""
        if not self.known:
            return f"{self.mean:.4g} (n={self.n}, no interval)"
        if self.generations:
            return (f"{self.mean:.4g} [{self.lo:.4g}, {self.hi:.4g}] (n={self.n}; Wilson interval of "
                    f"{self.generations} generations)")
        if self.n == 1:
            return f"{self.mean:.4g} (n=1, exact)"
        return f"{self.mean:.4g} [{self.lo:.4g}, {self.hi:.4g}] (n={self.n})"


def above(a: Interval, b: Interval) -> str:
    """Is A greater than B? holds / fails / inconclusive, by separation of the intervals."""
    if not (a.known and b.known):
        return INCONCLUSIVE
    if a.lo > b.hi:
        return HOLDS
    if a.hi <= b.lo:
        return FAILS
    return INCONCLUSIVE


PROPORTIONS = ("AR_MU_", "AR_DiMRA_", "AR_final_", "forget_acc_")  # shares of one evaluation's generations
GENERATION_SHARES = (*PROPORTIONS, "resurgence")  # and a difference of two such shares
# shares of the same full-forget-prompt generations under the papers' names: [001]'s UA (not UA_partial, whose
# partial prompts are other images) and [003]'s erase ACC (AR_MU_top1)
FORGET_SHARES = ("UA", "erase_ACC")


def _share(metric: str, prefixes: tuple[str, ...]) -> bool:
    """A figure in generations of the full forget prompts (not the step at which one was reached)."""
    return metric in FORGET_SHARES or (metric.startswith(prefixes) and not metric.endswith("_step"))


# shares of the retain generations and the column counting them; [003]'s preserve ACC is IRA
RETAIN_SHARES = {"IRA": "IRA_images", "CRA": "CRA_images", "preserve_ACC": "IRA_images"}


def generations(rows: pd.DataFrame, metric: str, prefixes: tuple[str, ...] = PROPORTIONS) -> pd.Series | None:
    """The generations behind each row's `metric` (NaN where a row does not record them), or None
    for a figure that is no share of generations: forget shares by their runs' `AR_resolution`
    (100 / the forget images), IRA and CRA by the retain images they judged."""
    if metric in RETAIN_SHARES:
        column = RETAIN_SHARES[metric]
    elif _share(metric, prefixes):
        column = "AR_resolution"
    else:
        return None
    if column not in rows:
        import pandas as pd

        return pd.Series(float("nan"), index=rows.index)
    return rows[column] if metric in RETAIN_SHARES else (100.0 / rows[column]).round()


def resolution(rows: pd.DataFrame, metric: str) -> float | None:
    """The points one generation moves `metric` on these rows (the coarsest), or None for a
    figure that is not a share of generations or rows that do not record them."""
    counts = generations(rows, metric, GENERATION_SHARES)
    if counts is None or counts.dropna().empty:
        return None
    return float(100.0 / counts.dropna().min())


def wilson(successes: float, trials: float, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of `successes` in `trials`, in points (0-100):
    (k + z^2/2) / (n + z^2) +/- z / (n + z^2) * sqrt(k (n - k) / n + z^2 / 4)."""
    k, n = successes, trials
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(max(k * (n - k) / n, 0.0) + z * z / 4)
    return 100 * max(centre - half, 0.0), 100 * min(centre + half, 1.0)


def sampling_floor(rows: pd.DataFrame, metric: str, values: Interval) -> Interval:
    """For a share of generations: `values` widened to the Wilson interval of the generations
    behind it (`generations`, pooled; rows that do not record them get no floor), then cut to
    the shares' range [0, 100]. Any other figure unchanged. IRA or CRA averaged over two domains
    is not one Bernoulli trial per image, but its variance is at most one's at the same mean, so
    the floor stays a floor."""
    picked = rows[rows[metric].notna()] if metric in rows else rows.iloc[0:0]
    images = generations(picked, metric)
    if images is None or not values.known:
        return values
    if not images.empty and not images.isna().any():
        trials = float(images.sum())
        lo, hi = wilson(float((picked[metric] / 100.0 * images).sum()), trials)
        if lo < values.lo or hi > values.hi:
            values = Interval(values.mean, min(values.lo, lo), max(values.hi, hi), values.n,
                              generations=int(trials))
    return replace(values, lo=max(values.lo, 0.0), hi=min(values.hi, 100.0))


def resolved(verdict: str, difference: float, step: float | None) -> str:
    """A verdict on a difference smaller than one generation is noise: inconclusive."""
    if step is not None and verdict != INCONCLUSIVE and 0 < abs(difference) < step:
        return INCONCLUSIVE
    return verdict


def _coarsest(*steps: float | None) -> float | None:
    known = [x for x in steps if x is not None]
    return max(known) if known else None


def _resolution_note(step: float | None) -> str:
    return "" if step is None else f" (resolution {step:g} points)"


def combine(verdicts: list[str]) -> str:
    """Every part holds -> holds; any part fails -> fails; else inconclusive (no data if nothing)."""
    real = [v for v in verdicts if v != NO_DATA]
    if not real:
        return NO_DATA
    if any(v == FAILS for v in real):
        return FAILS
    if len(real) == len(verdicts) and all(v == HOLDS for v in real):
        return HOLDS
    return INCONCLUSIVE


@dataclass
class SliceResult:
    key: dict[str, str]
    verdict: str
    numbers: str


@dataclass
class ClaimResult:
    claim: Claim
    verdict: str
    slices: list[SliceResult] = field(default_factory=list)

    @property
    def comparison(self) -> str:
        return describe(self.claim)


def describe(claim: Claim) -> str:
    """The comparison a claim makes, in one line (e.g. `Total(method=core) > Total(others by method)`)."""

    def sel(s: Selection | None) -> str:
        if s is None:
            return ""
        parts = [f"{c}={'|'.join(s.values(c))}" for c in SELECTION_COLUMNS if s.values(c)]
        return ", ".join(parts) or "all"

    m, subject = claim.metric, sel(claim.subject)
    text = {
        "greater": f"{m}({subject}) > {m}({sel(claim.other)})",
        "less": f"{m}({subject}) < {m}({sel(claim.other)})",
        "best": f"{m}({subject}) > {m} of every other {claim.by} in ({sel(claim.among)})",
        "worst": f"{m}({subject}) < {m} of every other {claim.by} in ({sel(claim.among)})",
        "at_least": f"{m}({subject}) >= {claim.value:g}" if claim.value is not None else "",
        "at_most": f"{m}({subject}) <= {claim.value:g}" if claim.value is not None else "",
    }.get(claim.kind)
    if text is None:  # rises / falls / same
        start = f"{claim.from_metric}({subject})" if claim.from_metric else f"{m}({sel(claim.other)})"
        test = {"rises": "> 0", "falls": "< 0"}.get(claim.kind) or f"within +/-{claim.value:g}"
        text = f"{m}({subject}) - {start} {test} (paired by seed)"
    return text + (f", per {', '.join(claim.per)}" if claim.per else "")


# ---- evaluation over a results frame -----------------------------------------------------------

def select(frame: pd.DataFrame, selection: Selection | None, fixed: dict[str, str] | None = None) -> pd.DataFrame:
    """Rows matching a selection (attack defaults to 'none': erase runs), narrowed by the slice
    values `fixed`: a column the selection leaves open takes the slice's value, and so does one
    whose listed values include it (`per: [method]` over `method: [a, b]` judges a and b apart);
    a selection that lists other values (the `other` side, e.g. the original model) keeps them."""
    if selection is None:
        return frame.iloc[0:0]
    mask = frame["status"] == "complete"
    for column in SELECTION_COLUMNS:
        values = _narrowed(selection, column, fixed)
        if values is not None:
            mask &= frame[column].isin(values)
    return frame[mask]


def _narrowed(selection: Selection, column: str, fixed: dict[str, str] | None) -> list[str] | None:
    values = selection.values(column)
    if values is None and column == "attack":
        values = ["none"]
    if fixed and column in fixed and (values is None or fixed[column] in values):
        values = [fixed[column]]
    return values


def interval(rows: pd.DataFrame, metric: str) -> Interval | None:
    if metric not in rows.columns:
        return None
    values = rows[metric].dropna()
    if values.empty:
        return None
    seedless = bool(rows.loc[values.index, "seed"].isna().all())
    return sampling_floor(rows, metric, Interval.of(values.tolist(), exact=seedless))


def _label(rows: pd.DataFrame, selection: Selection, fixed: dict[str, str] | None = None) -> str:
    picked = []
    for column in ("method", "variant", "attack"):
        if selection.values(column):
            picked.append("|".join(_narrowed(selection, column, fixed) or []))
    return "/".join(picked) or "subject"


def evaluate_claim(claim: Claim, frame: pd.DataFrame) -> ClaimResult:
    subject_rows = select(frame, claim.subject)
    if claim.per:
        keys = subject_rows[claim.per].drop_duplicates().to_dict("records") if not subject_rows.empty else []
    else:
        keys = [{}]
    if not keys:
        return ClaimResult(claim, NO_DATA, [SliceResult({}, NO_DATA, "no finished runs yet")])
    slices = [_evaluate_slice(claim, frame, {k: str(v) for k, v in key.items()}) for key in keys]
    return ClaimResult(claim, combine([s.verdict for s in slices]), slices)


def _evaluate_slice(claim: Claim, frame: pd.DataFrame, key: dict[str, str]) -> SliceResult:
    m = claim.metric
    subject_rows = select(frame, claim.subject, key)
    subject = interval(subject_rows, m)
    if subject is None:
        return SliceResult(key, NO_DATA, f"no {m} for the subject yet")
    name = _label(subject_rows, claim.subject, key)
    if claim.kind in ("greater", "less"):
        other_rows = select(frame, claim.other, key)
        other = interval(other_rows, m)
        if other is None:
            return SliceResult(key, NO_DATA, f"no {m} for the other side yet")
        verdict = above(subject, other) if claim.kind == "greater" else above(other, subject)
        step = _coarsest(resolution(subject_rows, m), resolution(other_rows, m))
        return SliceResult(key, resolved(verdict, subject.mean - other.mean, step),
                           f"{m}: {name} {subject.text()} vs {_label(other_rows, claim.other, key)} "
                           f"{other.text()}{_resolution_note(step)}")
    if claim.kind in ("best", "worst"):
        return _best(claim, frame, key, subject_rows, subject, name)
    if claim.kind in ("at_least", "at_most"):
        value = float(claim.value)
        point = Interval(value, value, value, 1)
        verdict = above_or_equal(subject, point) if claim.kind == "at_least" else above_or_equal(point, subject)
        sign = ">=" if claim.kind == "at_least" else "<="
        return SliceResult(key, verdict, f"{m}: {name} {subject.text()} {sign} {value:g}?")
    return _change(claim, frame, key, subject_rows, name)


def above_or_equal(a: Interval, b: Interval) -> str:
    """Is A at least B? holds when A.lo >= B.hi, fails when A.hi < B.lo."""
    if not (a.known and b.known):
        return INCONCLUSIVE
    if a.lo >= b.hi:
        return HOLDS
    if a.hi < b.lo:
        return FAILS
    return INCONCLUSIVE


def within(change: Interval, margin: float) -> str:
    """Equivalence: the interval inside [-margin, margin] holds, wholly outside fails."""
    if not change.known:
        return INCONCLUSIVE
    if -margin <= change.lo and change.hi <= margin:
        return HOLDS
    if change.lo > margin or change.hi < -margin:
        return FAILS
    return INCONCLUSIVE


def _best(claim: Claim, frame: pd.DataFrame, key: dict[str, str], subject_rows: pd.DataFrame, subject: Interval,
          name: str) -> SliceResult:
    m, by = claim.metric, claim.by
    among = select(frame, claim.among, key)
    own = set(claim.subject.values(by) or subject_rows[by].unique().tolist())
    verdicts, parts = [], [f"{m}: {name} {subject.text()}"]
    for value, rows in among.groupby(by, sort=True):
        if value in own:
            continue
        other = interval(rows, m)
        if other is None:
            continue
        verdict = above(subject, other) if claim.kind == "best" else above(other, subject)
        step = _coarsest(resolution(subject_rows, m), resolution(rows, m))
        verdict = resolved(verdict, subject.mean - other.mean, step)
        verdicts.append(verdict)
        parts.append(f"{value} {other.text()}{'' if verdict == HOLDS else f' ({verdict})'}")
    if not verdicts:
        return SliceResult(key, NO_DATA, f"no competitor with {m} yet")
    return SliceResult(key, combine(verdicts), "; ".join(parts))


def _change(claim: Claim, frame: pd.DataFrame, key: dict[str, str], subject_rows: pd.DataFrame,
            name: str) -> SliceResult:
    m = claim.metric
    if claim.from_metric:
        start_label = claim.from_metric
        pairs = subject_rows[["seed", m, claim.from_metric]].dropna(subset=[m, claim.from_metric])
        differences = (pairs[m] - pairs[claim.from_metric]).tolist()
        seedless = bool(pairs["seed"].isna().all()) if not pairs.empty else False
        step = _coarsest(resolution(subject_rows, m), resolution(subject_rows, claim.from_metric))
    else:
        other_rows = select(frame, claim.other, key)
        start_label = f"{m} of {_label(other_rows, claim.other, key)}"
        differences, seedless = _paired(subject_rows, other_rows, m)
        step = _coarsest(resolution(subject_rows, m), resolution(other_rows, m))
    if not differences:
        return SliceResult(key, NO_DATA, f"no pairs of {m} and {start_label} yet")
    change = Interval.of(differences, exact=seedless)
    zero = Interval(0.0, 0.0, 0.0, 1)
    if claim.kind == "same":
        verdict = within(change, float(claim.value))
    else:
        verdict = resolved(above(change, zero) if claim.kind == "rises" else above(zero, change), change.mean, step)
    return SliceResult(key, verdict, f"{m} - {start_label} on {name}: {change.text()}{_resolution_note(step)}")


def _paired(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> tuple[list[float], bool]:
    """Per-seed differences a - b; a seedless b (a control) pairs with every seed of a."""
    a = a[["seed", metric]].dropna(subset=[metric])
    b = b[["seed", metric]].dropna(subset=[metric])
    if a.empty or b.empty:
        return [], False
    if b["seed"].isna().all():
        base = float(b[metric].mean())
        return [float(v) - base for v in a[metric]], bool(a["seed"].isna().all())
    by_seed = b.groupby("seed")[metric].mean()
    out = [float(v) - float(by_seed[s]) for s, v in zip(a["seed"], a[metric], strict=True) if s in by_seed.index]
    return out, False


def evaluate_claims(recipe: Recipe, frame: pd.DataFrame) -> list[ClaimResult]:
    return [evaluate_claim(claim, frame) for claim in recipe.claims]
