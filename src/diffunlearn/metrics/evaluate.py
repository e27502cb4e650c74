"""The evaluation protocol (TESTBED.md "Evaluation protocol", METHODS.md "Metrics"), for any
concept set and any evaluator.

Two steps, kept apart so the plan can be inspected, counted and tested without a model:
`build_prompt_sets` says which images to generate (prompt, seed, role, labels) from the
concept set, and `evaluate_model` generates them, asks the evaluator about them and turns the
answers into one JSON-able metrics dict with a bootstrap interval and a per-concept breakdown
beside each mean.

The plan, per forget concept c: its full prompts (`ConceptSet.full_items(c, exclude=forgotten)`:
the canvas' c with every non-forgotten concept of the other domain; a one-domain set's training
templates), its partial prompts (`alone_items(c, evaluation=True)`: the canvas' domain prompt; a
one-domain set's evaluation paraphrases), then the retain grid (`retain_grid(forgotten)`).
`eval.prompts=FILE.csv` replaces the forget prompts with the file's rows (I2P), each with its
own seed and guidance.

Metrics: UA and AR_* on forget prompts, each image judged in its forget concept's domain (by
the evaluator's classes, or by its detector's `presence`); IRA = accuracy on retain prompts in
the forget concepts' domains, CRA = in the other domains (None for a one-domain set); AR_CL
where the alternatives are concepts of the set; FID/KID/precision/recall of retain generations
against held-out reference images of an `ImageSource`. What cannot be computed is None, and
`not_computed` says why in one line.

Seeds depend only on the prompt text and `EvalConfig.seed` (or the CSV row's seed), never on
the position in the plan, so a prompt is sampled from the same noise before and after
unlearning, and in any evaluation that contains it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffunlearn.config import EvalConfig
from diffunlearn.data.concepts import ConceptSet, Item
from diffunlearn.data.images import HELDOUT_OFFSET, CanvasSource, ImageSource
from diffunlearn.metrics import accuracy as acc
from diffunlearn.metrics.fid import distribution_metrics

if TYPE_CHECKING:
    from torch import nn

    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.metrics.evaluators.base import Evaluator

ROLES = ("forget-full", "forget-partial", "retain")
FORGET_ROLES = ("forget-full", "forget-partial")
TOPK = 3
PRESENT = 0.5  # a detector's presence at or above this counts as showing the concept
QUALITY_KEYS = ("FID", "KID", "precision", "recall")


# ---- the plan --------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlanItem:
    """One image to generate and what it is supposed to show."""

    prompt: str
    seed: int
    role: str  # one of ROLES
    labels: tuple[tuple[str, str], ...] = ()  # ((domain, concept), ...) the prompt names
    forget: str | None = None  # the forget concept the prompt contains (forget roles only)
    alternatives: tuple[str, ...] = ()  # concepts that count for AR_CL (forget roles only)
    index: int = 0  # image number within its prompt
    template: str = ""  # the concept set's template the prompt renders (empty for CSV prompts)
    guidance: float | None = None  # a CSV row's own guidance; None: the evaluation's

    def label(self, domain: str) -> str | None:
        return dict(self.labels).get(domain)

    @property
    def item(self) -> Item:
        return Item(self.labels, self.template)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "labels": dict(self.labels), "alternatives": list(self.alternatives)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanItem:
        """Inverse of `to_dict` (plans cached as JSON come back as dicts); plans saved before
        concept sets had `style`/`object` fields instead of `labels`."""
        data = dict(data)
        labels = data.pop("labels", None)
        if labels is None:
            labels = {d: data[d] for d in ("style", "object") if data.get(d) is not None}
        data.pop("style", None), data.pop("object", None)
        return cls(**{**data, "labels": tuple(dict(labels).items()),
                      "alternatives": tuple(data.get("alternatives", ()))})


def prompt_seed_offset(prompt: str) -> int:
    """A stable 32-bit offset from the prompt text (sha256, not Python's salted `hash`).

    Prompt p's images use seeds `seed + offset(p) + i`; two prompts' seed ranges overlap only
    if their offsets are closer than the image count, which is negligible at 32 bits.
    """
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")


def _check_forget(concept_set: ConceptSet, forget: Sequence[str]) -> list[str]:
    concepts = list(dict.fromkeys(forget))
    concept_set.validate(concepts, None)  # ConceptSetError (a ValueError): empty, unknown, neutral
    return concepts


def _check_alternatives(concept_set: ConceptSet, forget: list[str], alternatives: Mapping[str, Sequence[str]] | None
                        ) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """Alternatives are judged in the forget concept's domain, so a concept of the set in another
    domain is an error; free text (an anchor that is no concept of the set) cannot be classified
    and is left out of AR_CL with a note. An alternative may itself be forgotten: CORE's
    derangement maps forget concepts onto each other."""
    out: dict[str, tuple[str, ...]] = {}
    notes: list[str] = []
    for concept, alts in (alternatives or {}).items():
        if concept not in forget:
            raise ValueError(f"alternatives given for '{concept}', which is not a forget concept")
        alts = (alts,) if isinstance(alts, str) else tuple(alts)
        kept = []
        for alt in alts:
            if alt not in concept_set:
                notes.append(f"AR_CL: alternative '{alt}' of '{concept}' is no concept of the set; not counted")
                continue
            if concept_set.domain_of(alt) != concept_set.domain_of(concept):
                raise ValueError(f"alternative '{alt}' is not in the domain of '{concept}'")
            kept.append(alt)
        out[concept] = tuple(kept)
    return out, notes


def _images(prompt: str, n: int, base_seed: int, item: Item, **fields: Any) -> list[PlanItem]:
    offset = prompt_seed_offset(prompt)
    return [PlanItem(prompt=prompt, seed=base_seed + offset + i, index=i, labels=item.labels, template=item.template,
                     **fields) for i in range(n)]


def _forget_items(concept_set: ConceptSet, concept: str, forgotten: set[str], eval_cfg: EvalConfig,
                  alts: tuple[str, ...]) -> list[PlanItem]:
    items: list[PlanItem] = []
    # a full prompt with two forget concepts has no single intended label: full_items excludes them
    for item in concept_set.full_items(concept, exclude=forgotten):
        items += _images(concept_set.render(item), eval_cfg.forget_images, eval_cfg.seed, item,
                         role="forget-full", forget=concept, alternatives=alts)
    for item in concept_set.alone_items(concept, evaluation=True):
        items += _images(concept_set.render(item), eval_cfg.partial_images, eval_cfg.seed, item,
                         role="forget-partial", forget=concept, alternatives=alts)
    return items


def _csv_items(concept_set: ConceptSet, concepts: list[str], eval_cfg: EvalConfig,
               alts: dict[str, tuple[str, ...]]) -> list[PlanItem]:
    """The rows of `eval.prompts` as forget prompts: a row's seed is its first image's seed (the
    next images count up from it), else the prompt-text seed; its guidance is sampled with."""
    from diffunlearn.metrics.prompts import assign_concepts, read_prompt_csv

    rows = read_prompt_csv(eval_cfg.prompts)
    items: list[PlanItem] = []
    for row, concept in zip(rows, assign_concepts(rows, concepts), strict=True):
        item = Item(((concept_set.domain_of(concept), concept),), "")
        base = row.seed if row.seed is not None else eval_cfg.seed + prompt_seed_offset(row.prompt)
        items += [PlanItem(prompt=row.prompt, seed=base + i, index=i, role="forget-full", labels=item.labels,
                           forget=concept, alternatives=alts.get(concept, ()), guidance=row.guidance)
                  for i in range(eval_cfg.forget_images)]
    return items


def build_prompt_sets(concept_set: ConceptSet, forget: Sequence[str], eval_cfg: EvalConfig,
                      alternatives: Mapping[str, Sequence[str]] | None = None) -> list[PlanItem]:
    """Every image of the protocol, in a fixed order: per forget concept its full prompts and its
    partial prompts (or the CSV's rows), then the retain grid (module docstring).

    Raises ValueError for an unknown or neutral forget concept or a bad alternative.
    """
    return _plan(concept_set, forget, eval_cfg, alternatives)[0]


def _plan(concept_set: ConceptSet, forget: Sequence[str], eval_cfg: EvalConfig,
          alternatives: Mapping[str, Sequence[str]] | None) -> tuple[list[PlanItem], list[str]]:
    concepts = _check_forget(concept_set, forget)
    alts, notes = _check_alternatives(concept_set, concepts, alternatives)
    forgotten = set(concepts)
    plan: list[PlanItem] = []
    if eval_cfg.prompts:
        plan += _csv_items(concept_set, concepts, eval_cfg, alts)
    else:
        for concept in concepts:
            plan += _forget_items(concept_set, concept, forgotten, eval_cfg, alts.get(concept, ()))
    for item in concept_set.retain_grid(forgotten):
        plan += _images(concept_set.render(item), eval_cfg.images_per_prompt, eval_cfg.seed, item, role="retain")
    return plan, notes


# ---- results ---------------------------------------------------------------------------------

@dataclass
class Evaluation:
    """The metrics (JSON-able) plus what produced them, for sample grids and re-analysis."""

    metrics: dict[str, Any]
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1], aligned with `plan`
    plan: list[PlanItem] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.plan = [it if isinstance(it, PlanItem) else PlanItem.from_dict(it) for it in self.plan]

    def save(self, folder: Path) -> None:
        """images.npy (no pickle) and metrics.json with the plan; `load` reads them back."""

        import numpy as np

        from diffunlearn.io import atomic_write_json

        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "images.npy", self.images.numpy(), allow_pickle=False)
        # NaN/inf become null (io.dump_json), so the file is valid JSON for any reader
        atomic_write_json(folder / "metrics.json", {"metrics": self.metrics, "plan": [p.to_dict() for p in self.plan]})

    @classmethod
    def load(cls, folder: Path) -> Evaluation:
        """Raises OSError, ValueError or KeyError for a missing or corrupt folder."""
        import json

        import numpy as np

        saved = json.loads((folder / "metrics.json").read_text())
        images = torch.from_numpy(np.load(folder / "images.npy", allow_pickle=False))
        return cls(metrics=saved["metrics"], images=images, plan=saved["plan"])

    def by_prompt(self, role: str | None = None, limit: int | None = None) -> dict[str, torch.Tensor]:
        """Images grouped by prompt in plan order (optionally one role, first `limit` per prompt)."""
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(self.plan):
            if role is None or item.role == role:
                groups.setdefault(item.prompt, []).append(i)
        return {p: self.images[idx[:limit]] for p, idx in groups.items()}


# ---- generation ------------------------------------------------------------------------------

def _generate(model: T2IModel, plan: list[PlanItem], eval_cfg: EvalConfig, guidance: float,
              progress: bool) -> torch.Tensor:
    """Sample every plan image; images with their own guidance (CSV rows) are batched with
    others of the same guidance, and the output keeps the plan's order."""
    from tqdm import tqdm

    size = eval_cfg.batch_size
    groups: dict[float, list[int]] = {}
    for i, item in enumerate(plan):
        groups.setdefault(float(item.guidance) if item.guidance is not None else guidance, []).append(i)
    batches = [(g, idx[s : s + size]) for g, idx in groups.items() for s in range(0, len(idx), size)]
    out: torch.Tensor | None = None
    for g, idx in tqdm(batches, desc="evaluate: sampling", unit="batch", disable=not progress):
        images = model.sample([plan[i].prompt for i in idx], [plan[i].seed for i in idx], steps=eval_cfg.steps,
                              guidance=g, batch_size=size).float().cpu()
        if out is None:
            out = torch.zeros(len(plan), *images.shape[1:])
        out[idx] = images
    return out if out is not None else torch.zeros(0, 3, model.pixel_size, model.pixel_size)


# ---- judging ---------------------------------------------------------------------------------

class _Reasons:
    """Metrics that could not be computed and why, for the one-line `not_computed` message."""

    def __init__(self) -> None:
        self.items: dict[str, list[str]] = {}

    def add(self, reason: str, *metrics: str) -> None:
        names = self.items.setdefault(reason, [])
        names += [m for m in metrics if m not in names]

    def line(self) -> str | None:
        if not self.items:
            return None
        return "not computed: " + "; ".join(f"{', '.join(m)} ({r})" for r, m in self.items.items())


def _summary(values: torch.Tensor, eval_cfg: EvalConfig) -> tuple[float | None, list[float] | None]:
    """Mean and bootstrap interval; None for an empty set (e.g. every style forgotten)."""
    if values.numel() == 0:
        return None, None
    ci = acc.bootstrap_ci(values, eval_cfg.bootstrap, eval_cfg.seed) if eval_cfg.bootstrap else None
    return float(values.mean()), (list(ci) if ci is not None else None)


def _classes(evaluator: Evaluator | None, domain: str) -> list[str] | None:
    return evaluator.classes(domain) if evaluator is not None else None


def _forget_values(plan: list[PlanItem], role: str, images: torch.Tensor, probs: dict[str, torch.Tensor],
                   evaluator: Evaluator | None, concept_set: ConceptSet, reasons: _Reasons) -> dict[str, Any]:
    """Per-image values on one forget role, each image judged in its forget concept's domain:
    by the evaluator's classifier when it knows the concept, else by its detector."""
    out: dict[str, list] = {k: [] for k in ("ua", "top1", "top3", "p", "entropy", "labels", "cl", "cl_labels")}
    for domain in concept_set.domains:
        pos = [i for i, it in enumerate(plan) if it.role == role and concept_set.domain_of(it.forget) == domain]
        if not pos:
            continue
        classes = _classes(evaluator, domain)
        judged = [i for i in pos if classes is not None and plan[i].forget in classes]
        if judged:
            p = probs[domain][judged]
            target = [classes.index(plan[i].forget) for i in judged]
            out["ua"].append(100 * (1 - acc.correct(p, target)))
            out["top1"].append(100 * acc.in_topk(p, target, 1))
            out["top3"].append(100 * acc.in_topk(p, target, TOPK))
            out["p"].append(acc.class_probability(p, target))
            out["entropy"].append(acc.entropy(p))
            out["labels"] += [plan[i].forget for i in judged]
            with_alts = [k for k, i in enumerate(judged) if plan[i].alternatives
                         and all(a in classes for a in plan[i].alternatives)]
            if with_alts:
                sets = [[classes.index(a) for a in plan[judged[k]].alternatives] for k in with_alts]
                out["cl"].append(100 * acc.in_sets(p[with_alts], sets))
                out["cl_labels"] += [plan[judged[k]].forget for k in with_alts]
        unjudged = [i for i in pos if i not in set(judged)]
        for concept in dict.fromkeys(plan[i].forget for i in unjudged):
            where = [i for i in pos if plan[i].forget == concept]
            present = evaluator.presence(images[where], concept) if evaluator is not None else None
            if present is None:
                who = f"evaluator {evaluator.spec}" if evaluator is not None else "no evaluator"
                reasons.add(f"{who} cannot judge '{concept}'", "UA" if role == "forget-full" else "UA_partial",
                            *(("AR_MU_top1", "AR_MU_top3", "p_forget", "entropy") if role == "forget-full" else ()))
                continue
            if role == "forget-full":
                reasons.add(f"evaluator {evaluator.spec} detects '{concept}' without class probabilities",
                            "AR_MU_top3", "entropy")
            shown = (present.double() >= PRESENT).double()
            out["ua"].append(100 * (1 - shown))
            out["top1"].append(100 * shown)
            out["p"].append(present.double())
            out["labels"] += [concept] * len(where)
    return {k: (v if k.endswith("labels") else _cat(v)) for k, v in out.items()}


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _correct_by_domain(plan: list[PlanItem], pos: list[int], domains: list[str], probs: dict[str, torch.Tensor],
                       evaluator: Evaluator) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-image accuracy averaged over `domains` (each judged by the evaluator's classes of that
    domain), and the per-concept accuracy of every concept of those domains. An image whose label
    in a domain is no class of the evaluator is not judged in that domain."""
    rows, per_concept = [], {}
    for domain in domains:
        classes = evaluator.classes(domain)
        labels = [plan[i].label(domain) for i in pos]
        ok = [k for k, label in enumerate(labels) if label in classes]
        hits = 100 * acc.correct(probs[domain][[pos[k] for k in ok]], [classes.index(labels[k]) for k in ok])
        row = torch.full((len(pos),), float("nan"), dtype=torch.float64)
        row[ok] = hits
        rows.append(row)
        per_concept.update(acc.per_group(hits, [labels[k] for k in ok]))
    if not pos or not rows:
        return torch.zeros(0, dtype=torch.float64), per_concept
    stacked = torch.stack(rows)
    if not stacked.isnan().any():
        return stacked.mean(0), per_concept
    judged = ~stacked.isnan()
    keep = judged.any(0)
    values = stacked.nan_to_num(0).sum(0)[keep] / judged.sum(0)[keep]
    return values, per_concept


def _judge(plan: list[PlanItem], images: torch.Tensor, evaluator: Evaluator | None, concept_set: ConceptSet,
           forget: list[str], eval_cfg: EvalConfig, reasons: _Reasons) -> dict[str, Any]:
    """UA, IRA, CRA, AR_*, P(y=c_f) and entropy with intervals, and the per-concept breakdown.

    IRA is judged in the forget concepts' domains, CRA in every domain other than some forget
    concept's: on the canvas with forget concepts in both domains both are the mean of style and
    object accuracy on the retain grid, as TESTBED.md defines.
    """
    domains = list(concept_set.domains)
    classifiable = [d for d in domains if _classes(evaluator, d) is not None]
    probs = {d: evaluator.probabilities(images, d).double() for d in classifiable}
    forget_domains = [d for d in domains if any(concept_set.domain_of(c) == d for c in forget)]
    other_domains = [d for d in domains if any(d != f for f in forget_domains)]
    full = _forget_values(plan, "forget-full", images, probs, evaluator, concept_set, reasons)
    partial = _forget_values(plan, "forget-partial", images, probs, evaluator, concept_set, reasons)
    retain = [i for i, it in enumerate(plan) if it.role == "retain"]
    who = f"evaluator {evaluator.spec}" if evaluator is not None else "no evaluator"
    for key, wanted in (("IRA", forget_domains), ("CRA", other_domains)):
        missing = [d for d in wanted if d not in classifiable]
        if missing:
            reasons.add(f"{who} classifies no {'/'.join(missing)}", key)
    if not other_domains:
        reasons.add("the concept set has one domain", "CRA")
    ira, ira_concepts = _correct_by_domain(plan, retain, [d for d in forget_domains if d in classifiable], probs,
                                           evaluator)
    cra, cra_concepts = _correct_by_domain(plan, retain, [d for d in other_domains if d in classifiable], probs,
                                           evaluator)
    if any(it.alternatives for it in plan) and not full["cl_labels"]:
        reasons.add(f"{who} cannot classify the alternatives", "AR_CL")

    m: dict[str, Any] = {}
    for key, values in (("UA", full["ua"]), ("UA_partial", partial["ua"]), ("IRA", ira), ("CRA", cra),
                        ("AR_MU_top1", full["top1"]), ("AR_MU_top3", full["top3"]), ("AR_CL", full["cl"]),
                        ("p_forget", full["p"]), ("entropy", full["entropy"])):
        m[key], m[f"{key}_ci"] = _summary(values, eval_cfg)
    m["per_concept"] = {
        "UA": acc.per_group(full["ua"], full["labels"]),
        "UA_partial": acc.per_group(partial["ua"], partial["labels"]),
        "IRA": ira_concepts,
        "CRA": cra_concepts,
        "AR_CL": acc.per_group(full["cl"], full["cl_labels"]) if full["cl_labels"] else None,
    }
    m["judged"] = {"IRA": int(ira.numel()), "CRA": int(cra.numel())}  # the retain images behind each
    return m


def _reference_images(reference: ImageSource | None, plan: list[PlanItem], pos: list[int], eval_cfg: EvalConfig,
                      images: torch.Tensor) -> torch.Tensor:
    """Held-out reference images: `fid_reference_per_pair` per distinct retain label set."""
    items = list({plan[i].labels: plan[i].item for i in pos}.values())
    n_ref = eval_cfg.fid_reference_per_pair
    ref_items = [item for item in items for _ in range(n_ref)]
    ref_index = [HELDOUT_OFFSET + i for _ in items for i in range(n_ref)]
    if not ref_items or reference is None:
        return torch.zeros(0, *images.shape[1:])
    return torch.from_numpy(reference.images(ref_items, ref_index, int(images.shape[-1])))


def _quality(feature: nn.Module | None, reference: ImageSource | None, plan: list[PlanItem], images: torch.Tensor,
             eval_cfg: EvalConfig, reasons: _Reasons, why_no_feature: str) -> dict[str, Any]:
    """FID/KID/precision/recall of retain-grid generations vs held-out reference images."""
    pos = [i for i, it in enumerate(plan) if it.role == "retain"]
    empty = {"fid": None, "kid_mean": None, "kid_std": None, "precision": None, "recall": None, "n_real": 0,
             "n_fake": len(pos), "feature_dim": None}
    if feature is None:
        reasons.add(why_no_feature, *QUALITY_KEYS)
        return empty
    if reference is None:
        reasons.add("no reference images for the concept set", *QUALITY_KEYS)
        return empty
    real = _reference_images(reference, plan, pos, eval_cfg, images)
    return distribution_metrics(real, images[pos], feature, seed=eval_cfg.seed, batch_size=eval_cfg.batch_size)


def _sfid_total(m: dict[str, Any], fid: float | None, reference_fid: float | None
                ) -> tuple[float | None, float | None]:
    """SFID and Total ([001] App. B); None when the original model's FID is not given."""
    score = acc.sfid(reference_fid, fid) if reference_fid is not None and fid is not None else None
    parts = (m["UA"], m["IRA"], m["CRA"], score)
    return score, (acc.total(*parts) if all(v is not None for v in parts) else None)


def _counts(plan: list[PlanItem], eval_cfg: EvalConfig, guidance: float, quality: dict[str, Any],
            image_size: int, data_seed: int) -> dict[str, Any]:
    counts: dict[str, Any] = {role: sum(it.role == role for it in plan) for role in ROLES}
    counts["prompts"] = {role: len({it.prompt for it in plan if it.role == role}) for role in ROLES}
    counts.update(
        images=len(plan), images_per_prompt=eval_cfg.images_per_prompt, partial_images=eval_cfg.partial_images,
        forget_images_per_prompt=eval_cfg.forget_images,
        seed=eval_cfg.seed, steps=eval_cfg.steps, guidance=guidance, bootstrap=eval_cfg.bootstrap,
        reference=quality["n_real"], reference_per_pair=eval_cfg.fid_reference_per_pair,
        reference_seed=data_seed, feature_dim=quality["feature_dim"], image_size=image_size,
    )
    return counts


def evaluate_model(model: T2IModel, evaluator: Evaluator | None, forget: Sequence[str], eval_cfg: EvalConfig, *,
                   concept_set: ConceptSet | None = None, alternatives: Mapping[str, Sequence[str]] | None = None,
                   reference_fid: float | None = None, reference: ImageSource | None = None,
                   fid_feature: nn.Module | None | str = "evaluator", progress: bool = True, data_seed: int = 0,
                   ) -> Evaluation:
    """Generate the protocol's images with `model`, ask `evaluator` about them and compute every
    metric it allows (all None, with the reason, without an evaluator: the images are still made).

    `concept_set` defaults to the evaluator's; `reference_fid` is the original model's FID under the
    same protocol (gives SFID and Total); `alternatives` maps a forget concept to the concept(s) it
    should turn into (gives AR_CL); `reference` gives the held-out real images of FID/KID (default:
    the canvas renders, seed `data_seed`, for a set whose images are the canvas); `fid_feature` is
    the FID/KID feature extractor ('evaluator': the evaluator's own, None: no FID).
    Deterministic: the same model, evaluator and config give the same metrics.
    """
    if concept_set is None:
        if evaluator is None:
            raise ValueError("evaluate_model needs a concept set when no evaluator is given")
        concept_set = evaluator.concept_set
    plan, notes = _plan(concept_set, forget, eval_cfg, alternatives)
    concepts = list(dict.fromkeys(forget))
    guidance = float(eval_cfg.guidance if eval_cfg.guidance is not None else model.guidance_scale)
    images = _generate(model, plan, eval_cfg, guidance, progress)
    reasons = _Reasons()
    m = _judge(plan, images, evaluator, concept_set, concepts, eval_cfg, reasons)
    if fid_feature == "evaluator":
        fid_feature = evaluator.feature_extractor() if evaluator is not None else None
        why = f"evaluator {evaluator.spec} has no feature space; set eval.fid_features=inception:FILE" if (
            evaluator is not None) else "no evaluator; set eval.fid_features=inception:FILE"
    else:
        why = "eval.fid_features=none"
    if reference is None and concept_set.images.source == "canvas":
        reference = CanvasSource(seed=data_seed)
    quality = _quality(fid_feature, reference, plan, images, eval_cfg, reasons, why)
    sfid_score, total_score = _sfid_total(m, quality["fid"], reference_fid)
    per_concept = m.pop("per_concept")
    judged = m.pop("judged")
    metrics = {
        **m,
        "FID": quality["fid"], "FID_original": reference_fid, "SFID": sfid_score, "Total": total_score,
        "KID": quality["kid_mean"], "KID_std": quality["kid_std"],
        "precision": quality["precision"], "recall": quality["recall"],
        "per_concept": per_concept,
        "counts": {**_counts(plan, eval_cfg, guidance, quality, int(images.shape[-1]), data_seed),
                   "judged": judged},
    }
    if evaluator is not None:
        metrics.update(evaluator.extra(images, [it.prompt for it in plan], [it.role for it in plan]))
    metrics["evaluator"] = evaluator.spec if evaluator is not None else None
    metrics["not_computed"] = reasons.line()
    metrics["notes"] = [*(evaluator.notes if evaluator is not None else []), *notes]
    return Evaluation(metrics=metrics, images=images, plan=plan)
