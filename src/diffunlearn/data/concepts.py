"""Concepts as data: what a concept is, which prompts show it, what it may be steered to,
and where its images come from (DESIGN.md "Concept sets").

A *concept set* has domains (the canvas: `style` and `object`; a free-text set: one domain),
each with its concepts, an optional neutral concept (never erased; shown where a prompt
needs a concept of that domain but no erasable one), a generic mapping word (MACE's mapping
concept, UCE's guide) and prompt templates. Prompts are built from templates whose
placeholders are domain names: `"an image of {object} in {style} style"` names one concept of
each domain (a *combined* template), `"a painting in the style of {style}"` one concept alone.

The unlearning world of a set is a list of `Item`s, each a labelled prompt that images show:
with combined templates, every combination of the domains' concepts (the canvas: every
style-object pair, neutral ones included); otherwise every concept with each of its domain's
templates. `data/tasks.py` selects D_f and D_r from these items; metrics build their
evaluation prompts from the same set; methods and attacks never name the canvas.

Three ways to get a set, all validated before torch loads:
- `canvas`: the built-in set of the shipped testbeds (`data/concept_sets/canvas.yaml`);
- `--forget "Van Gogh" [--retain ...] [--anchor TEXT] [--domain style]`: a free-text set made on
  the fly with the default templates of its domain;
- `--concepts FILE.yaml`: full control (schema: `ConceptSetFile`).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from diffunlearn.config import ConfigError, StrictModel, build, load_yaml

SETS_DIR = Path(__file__).resolve().parent / "concept_sets"
BUILTIN_SETS = ("canvas",)
FREE_TEXT_DOMAINS = ("concept", "style", "object", "celebrity", "nudity")


class ConceptSetError(ConfigError):
    """A concept or concept set the user named that cannot be used; the message is one line."""


# ---- the YAML schema ----------------------------------------------------------------------------

class ConceptEntry(StrictModel):
    """One concept; a bare string in YAML is `{name: ...}`."""

    name: str = Field(min_length=1, max_length=200)
    text: str | None = Field(None, max_length=200, description="words used in prompts; default: the name")
    anchor: str | None = Field(None, max_length=200, description="concept or text it is steered to (default: "
                               "the anchor scheme decides; the empty prompt when nothing else exists)")
    images: str | None = Field(None, description="folder of this concept's images (overrides the set's source)")


class DomainEntry(StrictModel):
    concepts: list[str | ConceptEntry] = Field(min_length=1)
    neutral: str | None = Field(None, description="a concept of this domain that is never erased (canvas: plain)")
    generic: str | None = Field(None, description="generic mapping word (MACE's mapping concept, UCE's guide)")
    templates: list[str] | None = Field(None, description="prompts naming one concept of this domain alone, with "
                                        "{<domain>} as placeholder; default: the domain's defaults")
    eval_templates: list[str] | None = Field(None, description="paraphrases used only in evaluation")


class ImagesEntry(StrictModel):
    source: Literal["canvas", "folder", "generated"] = Field(
        "generated", description="canvas: rendered; folder: read from `path`; generated: by the original model")
    path: str | None = None
    layout: Literal["per-concept", "unlearncanvas", "imagefolder"] = Field(
        "per-concept", description="per-concept: PATH/<concept>/*; unlearncanvas: PATH/<style>/<object>/N.jpg; "
                                   "imagefolder: PATH/metadata.jsonl with file_name and text")

    @model_validator(mode="after")
    def _folder_needs_path(self) -> ImagesEntry:
        if self.source == "folder" and not self.path:
            raise ValueError("images.source=folder needs images.path")
        return self


class ConceptSetFile(StrictModel):
    """The schema of a concept-set YAML file (`--concepts FILE.yaml`)."""

    name: str = Field(min_length=1, max_length=100)
    domains: dict[str, DomainEntry] = Field(min_length=1)
    combined_templates: list[str] = Field(default_factory=list, description="prompts naming one concept of every "
                                          "domain, e.g. 'an image of {object} in {style} style'")
    images: ImagesEntry = ImagesEntry()
    evaluator: str | None = Field(None, description="default eval.evaluator for this set")


# Default templates of free-text domains: the training prompts and, for UA on paraphrases, the
# evaluation-only ones. Styles and objects follow the prompt families of ESD/UCE/CA evaluations.
DOMAIN_DEFAULTS: dict[str, dict[str, list[str] | str]] = {
    "concept": {"templates": ["{concept}", "an image of {concept}", "a photo of {concept}"],
                "eval_templates": ["a picture of {concept}", "{concept}, high quality"], "generic": ""},
    "style": {"templates": ["a painting in the style of {style}", "an artwork by {style}",
                            "a picture in {style} style"],
              "eval_templates": ["{style} style", "an image in the style of {style}"], "generic": "art"},
    "object": {"templates": ["a photo of a {object}", "an image of a {object}", "a picture of a {object}"],
               "eval_templates": ["a {object}", "a close-up photo of a {object}"], "generic": "ground"},
    "celebrity": {"templates": ["a portrait of {celebrity}", "a photo of {celebrity}",
                                "an image capturing {celebrity} at a public event"],
                  "eval_templates": ["{celebrity}", "a headshot of {celebrity}"], "generic": "a person"},
    "nudity": {"templates": ["{nudity}", "a photo of {nudity}"], "eval_templates": ["an image of {nudity}"],
               "generic": ""},
}


# ---- the runtime set ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Concept:
    name: str
    domain: str
    text: str
    anchor: str | None = None
    images: str | None = None
    neutral: bool = False


@dataclass(frozen=True)
class Item:
    """A labelled prompt of the unlearning world: `template` rendered with one concept per label."""

    labels: tuple[tuple[str, str], ...]  # ((domain, concept name or free text), ...)
    template: str

    @property
    def concepts(self) -> tuple[str, ...]:
        return tuple(c for _, c in self.labels)

    def label(self, domain: str) -> str | None:
        return dict(self.labels).get(domain)

    def swapped(self, old: str, new: str) -> Item:
        return Item(tuple((d, new if c == old else c) for d, c in self.labels), self.template)

    def without(self, concept: str) -> Item:
        """The item with `concept` removed: what remains of the image, prompted by the empty prompt."""
        return Item(tuple((d, c) for d, c in self.labels if c != concept), "")


@dataclass
class Domain:
    name: str
    concepts: list[Concept]
    neutral: Concept | None
    generic: str
    templates: list[str]
    eval_templates: list[str]

    @property
    def erasable(self) -> list[str]:
        return [c.name for c in self.concepts]

    @property
    def all(self) -> list[Concept]:
        return [*self.concepts, *([self.neutral] if self.neutral else [])]


@dataclass
class ConceptSet:
    """Domains of concepts, prompt templates and an image source; see the module docstring."""

    name: str
    domains: dict[str, Domain]
    combined_templates: list[str] = field(default_factory=list)
    images: ImagesEntry = field(default_factory=ImagesEntry)
    evaluator: str | None = None
    source: str = ""  # 'builtin:canvas', 'free-text', or the YAML file's path

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: ConceptSetFile, source: str = "") -> ConceptSet:
        domains: dict[str, Domain] = {}
        seen: dict[str, str] = {}
        for dname, entry in spec.domains.items():
            if not dname.isidentifier():
                raise ConceptSetError(f"concept set {spec.name}: domain name '{dname}' must be a single word")
            defaults = DOMAIN_DEFAULTS.get(dname, DOMAIN_DEFAULTS["concept"])
            templates = entry.templates or [t.replace("{concept}", "{" + dname + "}") for t in defaults["templates"]]
            eval_templates = entry.eval_templates
            if eval_templates is None:
                eval_templates = [t.replace("{concept}", "{" + dname + "}") for t in defaults["eval_templates"]]
            concepts = [_concept(e, dname) for e in entry.concepts]
            neutral = Concept(entry.neutral, dname, entry.neutral, neutral=True) if entry.neutral else None
            for c in [*concepts, *([neutral] if neutral else [])]:
                if c.name in seen:
                    raise ConceptSetError(f"concept set {spec.name}: concept '{c.name}' appears twice "
                                          f"(domains {seen[c.name]} and {dname})")
                seen[c.name] = dname
            for t in [*templates, *eval_templates]:
                _check_template(spec.name, t, {dname})
            generic = entry.generic if entry.generic is not None else str(defaults["generic"])
            domains[dname] = Domain(dname, concepts, neutral, generic, templates, eval_templates)
        for t in spec.combined_templates:
            _check_template(spec.name, t, set(domains), require_all=True)
        return cls(spec.name, domains, list(spec.combined_templates), spec.images, spec.evaluator, source)

    @classmethod
    def from_file(cls, path: str | Path) -> ConceptSet:
        data = load_yaml(path)
        return cls.from_spec(build(ConceptSetFile, data, "concepts."), source=str(Path(path).resolve()))

    @classmethod
    def builtin(cls, name: str) -> ConceptSet:
        if name not in BUILTIN_SETS:
            raise ConceptSetError(f"unknown concept set '{name}'; built-in sets: {', '.join(BUILTIN_SETS)}")
        return cls.from_spec(_builtin_spec(name).model_copy(deep=True), source=f"builtin:{name}")

    @classmethod
    def free_text(cls, forget: list[str], retain: list[str] | None = None, domain: str = "concept",
                  anchor: str | None = None) -> ConceptSet:
        """A one-domain set of the user's words, with the domain's default templates."""
        if domain not in FREE_TEXT_DOMAINS:
            raise ConceptSetError(f"unknown domain '{domain}' for free-text concepts; valid: "
                                  f"{', '.join(FREE_TEXT_DOMAINS)}")
        entries = [ConceptEntry(name=c, anchor=anchor) for c in forget] + [ConceptEntry(name=c)
                                                                          for c in (retain or [])]
        spec = ConceptSetFile(name="free-text", domains={domain: DomainEntry(concepts=entries)})
        return cls.from_spec(spec, source="free-text")

    # ---- lookup ------------------------------------------------------------------------------
    def erasable(self) -> list[str]:
        return [c for d in self.domains.values() for c in d.erasable]

    def concept(self, name: str) -> Concept:
        for d in self.domains.values():
            for c in d.all:
                if c.name == name:
                    return c
        raise self.unknown(name)

    def __contains__(self, name: object) -> bool:
        return any(c.name == name for d in self.domains.values() for c in d.all)

    def domain_of(self, name: str) -> str:
        return self.concept(name).domain

    def text(self, name: str) -> str:
        """The words a prompt uses for `name`; free text (an anchor that is no concept) is itself."""
        return self.concept(name).text if name in self else name

    def is_neutral(self, name: str) -> bool:
        return name in self and self.concept(name).neutral

    def unknown(self, name: str) -> ConceptSetError:
        valid = self.erasable()
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        neutral = " (neutral concepts are never erased)" if name in self else ""
        return ConceptSetError(f"unknown concept '{_clip(name, 40)}'{hint}{neutral}; valid concepts "
                               f"({_clip(self.name, 20)}): {_clip(', '.join(valid), 190)}")

    def validate(self, forget: list[str], retain: list[str] | None) -> None:
        """One-line ConceptSetError for an empty forget list, an unknown or neutral name, overlaps."""
        if not forget:
            raise ConceptSetError(f"no forget concept given; valid concepts: {', '.join(self.erasable()[:40])}")
        erasable = set(self.erasable())
        for name in [*forget, *(retain or [])]:
            if name not in erasable:
                raise self.unknown(name)
        both = sorted(set(forget) & set(retain or []))
        if both:
            raise ConceptSetError(f"concept(s) in both forget and retain: {', '.join(both)}")
        if len(set(forget)) != len(forget):
            raise ConceptSetError("a forget concept is listed twice")
        if retain is not None and len(set(retain)) != len(retain):
            raise ConceptSetError("a retain concept is listed twice")

    # ---- prompts -----------------------------------------------------------------------------
    @property
    def combined(self) -> bool:
        """True when prompts name one concept of every domain (the canvas)."""
        return bool(self.combined_templates) and len(self.domains) > 1

    def render(self, item: Item) -> str:
        return item.template.format(**{d: self.text(c) for d, c in item.labels})

    def items(self) -> list[Item]:
        """The unlearning world: every labelled prompt that images show (module docstring)."""
        if self.combined:
            names = [[c.name for c in d.all] for d in self.domains.values()]
            keys = list(self.domains)
            return [Item(tuple(zip(keys, combo, strict=True)), self.combined_templates[0])
                    for combo in itertools.product(*names)]
        return [Item(((d.name, c.name),), t) for d in self.domains.values() for c in d.all for t in d.templates]

    def alone_items(self, name: str, evaluation: bool = False) -> list[Item]:
        """Prompts naming `name` and nothing else of the set: its domain's captions (`templates`:
        benign fine-tuning data, a one-domain set's training prompts) or, with `evaluation`, the
        prompts UA is measured on besides the training ones (the canvas' partial prompts)."""
        domain = self.domains[self.domain_of(name)]
        templates = domain.eval_templates if evaluation else domain.templates
        return [Item(((domain.name, name),), t) for t in templates]

    def full_items(self, name: str, exclude: set[str] = frozenset()) -> list[Item]:
        """Prompts that show `name` as the training prompts do: with every erasable concept of
        the other domains not in `exclude` (combined sets), or with each domain template."""
        if not self.combined:
            return self.alone_items(name)
        domain = self.domain_of(name)
        others = [[c for c in d.erasable if c not in exclude] if d.name != domain else [name]
                  for d in self.domains.values()]
        keys = list(self.domains)
        return [Item(tuple(zip(keys, combo, strict=True)), self.combined_templates[0])
                for combo in itertools.product(*others)]

    def retain_grid(self, exclude: set[str]) -> list[Item]:
        """Evaluation prompts of retained concepts: the grid of erasable combinations without any
        excluded concept (combined sets), or each retained concept with each template."""
        if self.combined:
            names = [[c for c in d.erasable if c not in exclude] for d in self.domains.values()]
            keys = list(self.domains)
            return [Item(tuple(zip(keys, combo, strict=True)), self.combined_templates[0])
                    for combo in itertools.product(*names)]
        return [Item(((d.name, c),), t) for d in self.domains.values() for c in d.erasable if c not in exclude
                for t in d.templates]

    def anchor_prompt(self, item: Item, concept: str, anchor: str | None) -> str:
        """The prompt of `item` with `concept` steered to `anchor` (a concept or free text); the
        empty prompt when there is no anchor (ESD's and CA's unconditional target)."""
        if not anchor:
            return ""
        return self.render(item.swapped(concept, anchor))

    def vocabulary(self) -> list[str]:
        """Every word a prompt of the set can contain (for word-level tokenizers)."""
        words: list[str] = []
        for d in self.domains.values():
            for t in [*d.templates, *d.eval_templates]:
                words += t.replace("{" + d.name + "}", " ").split()
            words += [w for c in d.all for w in c.text.split()] + d.generic.split()
        for t in self.combined_templates:
            for dname in self.domains:
                t = t.replace("{" + dname + "}", " ")
            words += t.split()
        return list(dict.fromkeys(words))

    def fingerprint(self) -> str:
        """Hash of everything that decides prompts and images (part of every run id)."""
        data = {"name": self.name, "combined": self.combined_templates, "images": self.images.model_dump(),
                "domains": {n: {"concepts": [c.__dict__ for c in d.concepts],
                                "neutral": d.neutral.__dict__ if d.neutral else None, "generic": d.generic,
                                "templates": d.templates, "eval_templates": d.eval_templates}
                            for n, d in self.domains.items()}}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> dict:
        """A JSON-able summary for config.yaml and `diffunlearn ls concepts`."""
        return {"name": self.name, "source": self.source, "fingerprint": self.fingerprint(),
                "images": self.images.source, "domains": {n: d.erasable for n, d in self.domains.items()}}


@functools.cache
def _builtin_spec(name: str) -> ConceptSetFile:
    """A shipped set's parsed file, read once per process (a grid resolves it for every run);
    `from_spec` builds a fresh ConceptSet from it each time, so callers may change theirs."""
    return build(ConceptSetFile, load_yaml(SETS_DIR / f"{name}.yaml"), "concepts.")


def _concept(entry: str | ConceptEntry, domain: str) -> Concept:
    if isinstance(entry, str):
        entry = ConceptEntry(name=entry)
    return Concept(entry.name, domain, entry.text or entry.name, entry.anchor, entry.images)


def _check_template(set_name: str, template: str, allowed: set[str], require_all: bool = False) -> None:
    import string

    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise ConceptSetError(f"concept set {set_name}: malformed template '{_clip(template)}': {err}") from None
    if not fields <= allowed or (require_all and fields != allowed) or not fields:
        raise ConceptSetError(f"concept set {set_name}: template '{_clip(template)}' must use "
                              f"{'all of' if require_all else 'one of'} {{{'}, {'.join(sorted(allowed))}}}")


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_concept_set(concepts: str | None, forget: list[str], retain: list[str] | None, model_kind: str | None,
                        domain: str | None = None, anchor: str | None = None) -> ConceptSet:
    """The set a run uses: `--concepts FILE|NAME`; else the model's built-in set (the shipped
    testbeds: canvas) when every named concept is in it; else a free-text set of the names."""
    if concepts:
        path = Path(concepts)
        cset = ConceptSet.builtin(concepts) if concepts in BUILTIN_SETS and not path.exists() else (
            ConceptSet.from_file(path))
    elif model_kind in ("testbed", "testbed-sd") and (not forget or all(
            n in ConceptSet.builtin("canvas") for n in [*forget, *(retain or [])])):
        cset = ConceptSet.builtin("canvas")
    elif model_kind in ("testbed", "testbed-sd"):
        canvas_set = ConceptSet.builtin("canvas")
        bad = next(n for n in [*forget, *(retain or [])] if n not in canvas_set)
        close = difflib.get_close_matches(bad, canvas_set.erasable(), n=1)
        if close or bad in canvas_set:
            raise canvas_set.unknown(bad)
        raise ConceptSetError(f"unknown concept '{_clip(bad, 40)}': the shipped testbeds know only the canvas "
                              "(`diffunlearn ls concepts`); free text needs --model PATH (a Stable Diffusion folder)")
    else:
        cset = ConceptSet.free_text(forget, retain, domain or "concept", anchor)
    if anchor is not None and cset.source != "free-text":
        cset = _with_anchor(cset, forget, anchor)
    return cset


def _with_anchor(cset: ConceptSet, forget: list[str], anchor: str) -> ConceptSet:
    """`--anchor TEXT` on a built-in or file set: the forget concepts are steered to it."""
    for d in cset.domains.values():
        d.concepts = [Concept(c.name, c.domain, c.text, anchor, c.images, c.neutral) if c.name in forget else c
                      for c in d.concepts]
    return cset
