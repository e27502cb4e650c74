"""The evaluation protocol (TESTBED.md "Evaluation protocol", METHODS.md "Metrics").

Two steps, kept apart so the plan can be inspected, counted and tested without a model:
`build_prompt_sets` says which images to generate (prompt, seed, role, labels), and
`evaluate_model` generates them, classifies them and turns the outputs into one JSON-able
metrics dict with a bootstrap interval and a per-concept breakdown beside each mean.

Seeds depend only on the prompt text and `EvalConfig.seed`, never on the position in the
plan, so a prompt is sampled from the same noise before and after unlearning, and in any
evaluation that contains it: before/after differences are then differences of the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffunlearn.config import EvalConfig
from diffunlearn.data import canvas
from diffunlearn.metrics import accuracy as acc
from diffunlearn.metrics.classifier import EvaluatorFeatures, Evaluators
from diffunlearn.metrics.fid import distribution_metrics

if TYPE_CHECKING:
    from diffunlearn.backends.diffusers_t2i import T2IModel

ROLES = ("forget-full", "forget-partial", "retain")
OTHER_DOMAIN = {"style": "object", "object": "style"}
TOPK = 3


# ---- the plan --------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlanItem:
    """One image to generate and what it is supposed to show."""

    prompt: str
    seed: int
    role: str  # one of ROLES
    style: str | None  # None: the prompt names no style (partial object prompt)
    object: str | None  # None: the prompt names no object (partial style prompt)
    forget: str | None = None  # the forget concept the prompt contains (forget roles only)
    alternatives: tuple[str, ...] = ()  # concepts that count for AR_CL (forget roles only)
    index: int = 0  # image number within its prompt

    def label(self, domain: str) -> str | None:
        return self.style if domain == "style" else self.object

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "alternatives": list(self.alternatives)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanItem:
        """Inverse of `to_dict` (plans cached as JSON come back as dicts)."""
        return cls(**{**data, "alternatives": tuple(data.get("alternatives", ()))})


def prompt_seed_offset(prompt: str) -> int:
    """A stable 32-bit offset from the prompt text (sha256, not Python's salted `hash`).

    Prompt p's images use seeds `seed + offset(p) + i`; two prompts' seed ranges overlap only
    if their offsets are closer than the image count, which is negligible at 32 bits.
    """
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")


def _erasable(domain: str) -> tuple[str, ...]:
    return canvas.STYLES if domain == "style" else canvas.OBJECTS


def _check_forget(forget: Sequence[str]) -> list[str]:
    concepts = list(dict.fromkeys(forget))
    if not concepts:
        raise ValueError("evaluation needs at least one forget concept")
    erasable = set(canvas.erasable_concepts())
    bad = [c for c in concepts if c not in erasable]
    if bad:
        raise ValueError(f"not an erasable concept: {', '.join(bad)} (valid: {', '.join(sorted(erasable))})")
    return concepts


def _check_alternatives(forget: list[str], alternatives: Mapping[str, Sequence[str]] | None
                        ) -> dict[str, tuple[str, ...]]:
    """Alternatives are classified by the forget concept's classifier, so same domain only.
    An alternative may itself be forgotten: CORE's derangement maps forget concepts onto each other."""
    out: dict[str, tuple[str, ...]] = {}
    for concept, alts in (alternatives or {}).items():
        if concept not in forget:
            raise ValueError(f"alternatives given for '{concept}', which is not a forget concept")
        alts = (alts,) if isinstance(alts, str) else tuple(alts)
        for alt in alts:
            if alt not in (*canvas.ALL_STYLES, *canvas.ALL_OBJECTS):
                raise ValueError(f"unknown alternative concept '{alt}' for '{concept}'")
            if canvas.concept_domain(alt) != canvas.concept_domain(concept):
                raise ValueError(f"alternative '{alt}' is not in the domain of '{concept}'")
        out[concept] = alts
    return out


def _images(prompt: str, n: int, base_seed: int, **labels: Any) -> list[PlanItem]:
    offset = prompt_seed_offset(prompt)
    return [PlanItem(prompt=prompt, seed=base_seed + offset + i, index=i, **labels) for i in range(n)]


def _forget_items(concept: str, forgotten: set[str], eval_cfg: EvalConfig, alts: tuple[str, ...]
                  ) -> list[PlanItem]:
    domain = canvas.concept_domain(concept)
    items: list[PlanItem] = []
    for other in _erasable(OTHER_DOMAIN[domain]):
        if other in forgotten:
            continue  # a prompt with two forget concepts has no single intended label
        style, obj = (concept, other) if domain == "style" else (other, concept)
        items += _images(canvas.full_prompt(style, obj), eval_cfg.images_per_prompt, eval_cfg.seed,
                         role="forget-full", style=style, object=obj, forget=concept, alternatives=alts)
    partial = canvas.partial_prompt(concept)
    labels = {"style": concept, "object": None} if domain == "style" else {"style": None, "object": concept}
    items += _images(partial, eval_cfg.partial_images, eval_cfg.seed, role="forget-partial",
                     forget=concept, alternatives=alts, **labels)
    return items


def build_prompt_sets(forget: Sequence[str], eval_cfg: EvalConfig,
                      alternatives: Mapping[str, Sequence[str]] | None = None) -> list[PlanItem]:
    """Every image of the protocol, in a fixed order: per forget concept its full prompts
    (with each non-forgotten erasable concept of the other domain) and its partial prompt,
    then the retain grid (every erasable style x object pair with neither forgotten).

    Raises ValueError for an unknown or neutral forget concept or a bad alternative.
    """
    concepts = _check_forget(forget)
    alts = _check_alternatives(concepts, alternatives)
    forgotten = set(concepts)
    plan: list[PlanItem] = []
    for concept in concepts:
        plan += _forget_items(concept, forgotten, eval_cfg, alts.get(concept, ()))
    for style in canvas.STYLES:
        for obj in canvas.OBJECTS:
            if style not in forgotten and obj not in forgotten:
                plan += _images(canvas.full_prompt(style, obj), eval_cfg.images_per_prompt, eval_cfg.seed,
                                role="retain", style=style, object=obj)
    return plan


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
        import json

        import numpy as np

        from diffunlearn.io import atomic_write_text

        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "images.npy", self.images.numpy(), allow_pickle=False)
        atomic_write_text(folder / "metrics.json", json.dumps(
            {"metrics": self.metrics, "plan": [p.to_dict() for p in self.plan]}, indent=2, default=_json_value))

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


def _json_value(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)


# ---- evaluation ------------------------------------------------------------------------------

def _generate(model: T2IModel, plan: list[PlanItem], eval_cfg: EvalConfig, guidance: float,
              progress: bool) -> torch.Tensor:
    from tqdm import tqdm

    size = eval_cfg.batch_size
    chunks = []
    for start in tqdm(range(0, len(plan), size), desc="evaluate: sampling", unit="batch",
                      disable=not progress, total=-(-len(plan) // size)):
        batch = plan[start : start + size]
        chunks.append(model.sample([it.prompt for it in batch], [it.seed for it in batch],
                                   steps=eval_cfg.steps, guidance=guidance, batch_size=size).float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, 3, model.pixel_size, model.pixel_size)


def _class_index(evaluators: Evaluators, domain: str, concept: str) -> int:
    _, names = evaluators.for_domain(domain)
    if concept not in names:
        raise ValueError(f"the {domain} evaluator has no class '{concept}' (classes: {', '.join(names)})")
    return names.index(concept)


def _summary(values: torch.Tensor, eval_cfg: EvalConfig) -> tuple[float | None, list[float] | None]:
    """Mean and bootstrap interval; None for an empty set (e.g. every style forgotten)."""
    if values.numel() == 0:
        return None, None
    ci = acc.bootstrap_ci(values, eval_cfg.bootstrap, eval_cfg.seed) if eval_cfg.bootstrap else None
    return float(values.mean()), (list(ci) if ci is not None else None)


def _forget_values(plan: list[PlanItem], role: str, probs: dict[str, torch.Tensor], evaluators: Evaluators
                   ) -> dict[str, Any]:
    """Per-image values on one forget role, each image judged by its forget concept's classifier."""
    out: dict[str, list] = {k: [] for k in ("ua", "top1", "top3", "p", "entropy", "labels", "cl", "cl_labels")}
    for domain in canvas.DOMAINS:
        pos = [i for i, it in enumerate(plan) if it.role == role and canvas.concept_domain(it.forget) == domain]
        if not pos:
            continue
        p = probs[domain][pos]
        target = [_class_index(evaluators, domain, plan[i].forget) for i in pos]
        out["ua"].append(100 * (1 - acc.correct(p, target)))
        out["top1"].append(100 * acc.in_topk(p, target, 1))
        out["top3"].append(100 * acc.in_topk(p, target, TOPK))
        out["p"].append(acc.class_probability(p, target))
        out["entropy"].append(acc.entropy(p))
        out["labels"] += [plan[i].forget for i in pos]
        with_alts = [k for k, i in enumerate(pos) if plan[i].alternatives]
        if with_alts:
            sets = [[_class_index(evaluators, domain, a) for a in plan[pos[k]].alternatives] for k in with_alts]
            out["cl"].append(100 * acc.in_sets(p[with_alts], sets))
            out["cl_labels"] += [plan[pos[k]].forget for k in with_alts]
    return {k: (v if k.endswith("labels") else _cat(v)) for k, v in out.items()}


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _correct_by_domain(plan: list[PlanItem], pos: list[int], domains: list[str], probs: dict[str, torch.Tensor],
                       evaluators: Evaluators) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-image accuracy averaged over `domains` (each judged by its own classifier), and the
    per-concept accuracy of every concept of those domains."""
    per_domain, per_concept = [], {}
    for domain in domains:
        labels = [plan[i].label(domain) for i in pos]
        hits = 100 * acc.correct(probs[domain][pos], [_class_index(evaluators, domain, c) for c in labels])
        per_domain.append(hits)
        per_concept.update(acc.per_group(hits, labels))
    values = torch.stack(per_domain).mean(0) if pos else torch.zeros(0, dtype=torch.float64)
    return values, per_concept


def _quality(evaluators: Evaluators, plan: list[PlanItem], images: torch.Tensor, eval_cfg: EvalConfig,
             data_seed: int) -> dict[str, Any]:
    """FID/KID/precision/recall of retain-grid generations vs held-out real canvas images."""
    pos = [i for i, it in enumerate(plan) if it.role == "retain"]
    pairs = list(dict.fromkeys((plan[i].style, plan[i].object) for i in pos))
    n_ref = eval_cfg.fid_reference_per_pair
    ref_pairs = [pair for pair in pairs for _ in range(n_ref)]
    ref_index = [canvas.HELDOUT_OFFSET + i for _ in pairs for i in range(n_ref)]
    size = images.shape[-1]
    if ref_pairs:
        real = torch.from_numpy(canvas.render_batch(ref_pairs, ref_index, seed=data_seed, size=size)[0])
    else:
        real = torch.zeros(0, *images.shape[1:])
    return distribution_metrics(real, images[pos], EvaluatorFeatures(evaluators), seed=eval_cfg.seed,
                                batch_size=eval_cfg.batch_size)


def _classifier_metrics(plan: list[PlanItem], images: torch.Tensor, evaluators: Evaluators,
                        forget: list[str], eval_cfg: EvalConfig) -> dict[str, Any]:
    """UA, IRA, CRA, AR_*, P(y=c_f) and entropy with intervals, and the per-concept breakdown.

    IRA/CRA with forget concepts in both domains average the two domains' accuracies, so
    they coincide then (each is the mean of style and object accuracy on the retain grid).
    """
    probs = {d: evaluators.probabilities(images, d).double() for d in canvas.DOMAINS}
    forget_domains = [d for d in canvas.DOMAINS if any(canvas.concept_domain(c) == d for c in forget)]
    other_domains = [d for d in canvas.DOMAINS if d in {OTHER_DOMAIN[f] for f in forget_domains}]
    full = _forget_values(plan, "forget-full", probs, evaluators)
    partial = _forget_values(plan, "forget-partial", probs, evaluators)
    retain = [i for i, it in enumerate(plan) if it.role == "retain"]
    ira, ira_concepts = _correct_by_domain(plan, retain, forget_domains, probs, evaluators)
    cra, cra_concepts = _correct_by_domain(plan, retain, other_domains, probs, evaluators)

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
    return m


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
        seed=eval_cfg.seed, steps=eval_cfg.steps, guidance=guidance, bootstrap=eval_cfg.bootstrap,
        reference=quality["n_real"], reference_per_pair=eval_cfg.fid_reference_per_pair,
        reference_seed=data_seed, feature_dim=quality["feature_dim"], image_size=image_size,
    )
    return counts


def evaluate_model(model: T2IModel, evaluators: Evaluators, forget: Sequence[str], eval_cfg: EvalConfig,
                   alternatives: Mapping[str, Sequence[str]] | None = None, reference_fid: float | None = None,
                   progress: bool = True, data_seed: int = 0) -> Evaluation:
    """Generate the protocol's images with `model`, classify them and compute every metric.

    `reference_fid` is the original model's FID under the same protocol (gives SFID and
    Total); `alternatives` maps a forget concept to the concept(s) it should turn into
    (gives AR_CL); `data_seed` is the canvas seed of the held-out reference images.
    Deterministic: the same model, evaluators and config give the same metrics.
    """
    concepts = _check_forget(forget)
    plan = build_prompt_sets(concepts, eval_cfg, alternatives)
    guidance = float(eval_cfg.guidance if eval_cfg.guidance is not None else model.guidance_scale)
    images = _generate(model, plan, eval_cfg, guidance, progress)
    m = _classifier_metrics(plan, images, evaluators, concepts, eval_cfg)
    quality = _quality(evaluators, plan, images, eval_cfg, data_seed)
    sfid_score, total_score = _sfid_total(m, quality["fid"], reference_fid)
    per_concept = m.pop("per_concept")
    metrics = {
        **m,
        "FID": quality["fid"], "FID_original": reference_fid, "SFID": sfid_score, "Total": total_score,
        "KID": quality["kid_mean"], "KID_std": quality["kid_std"],
        "precision": quality["precision"], "recall": quality["recall"],
        "per_concept": per_concept,
        "counts": _counts(plan, eval_cfg, guidance, quality, int(images.shape[-1]), data_seed),
    }
    return Evaluation(metrics=metrics, images=images, plan=plan)
