"""Recipes: one headline experiment of the papers as data (`bench/recipes/*.yaml`).

A recipe names its paper, the model (default: the shipped testbed; `--model` overrides), the
seeds, the evaluation protocols (`fast` by default, `full` as an option), named forget sets,
run groups (methods x forget sets x variants, each erase optionally followed by attacks; an
attack several groups run is defined once under `attacks:` and listed by its id) and
the claims that test the paper's findings on our figures (`bench/claims.py`). Everything is
validated before any model loads: unknown keys, methods, attacks, concepts, forget-set and
group names, and claim selections all fail with one line.

    recipe = load_recipe("quick")        # a shipped name, or a path to a YAML file
    shipped_recipes()                   # the shipped names
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from diffunlearn.config import ConfigError, StrictModel, config_hash, load_yaml

RECIPE_DIR = Path(__file__).parent / "recipes"
ORIGINAL = "original"  # the control "method": the model itself, evaluated (and attacked) without unlearning
SELECTION_COLUMNS = ("group", "variant", "method", "forget", "attack")


class AttackStep(StrictModel):
    """An attack run on every erase run of its group (after it finishes)."""

    id: str = Field(description="label of this attack in results and claims, e.g. relearn-i")
    attack: str = Field(description="attack name (`diffunlearn ls attacks`)")
    overrides: list[str] = Field(default_factory=list, description="attack.*, eval.* key=value")
    methods: list[str] | None = Field(None, description="only after these methods of the group; default: all")
    variants: list[str] | None = Field(None, description="only after these variants of the group; default: all")

    @field_validator("attack")
    @classmethod
    def _known_attack(cls, name: str) -> str:
        from diffunlearn.attacks import attacks

        return attacks.check(name)


class MethodEntry(StrictModel):
    """A method under its own label, with its own overrides (e.g. AdvAnchor's adv2 loss beside adv1)."""

    label: str = Field(description="the name in results and claims, e.g. advanchor-adv2")
    method: str = Field(description="the registered method")
    overrides: list[str] = Field(default_factory=list, description="method.* / task.* overrides of this entry")

    @field_validator("method")
    @classmethod
    def _known(cls, name: str) -> str:
        from diffunlearn.methods import methods

        return methods.check(name)


class Group(StrictModel):
    """Erase runs: every method x forget set x variant x seed; then each attack on each."""

    id: str = Field(description="label of the group in results and claims")
    description: str = ""
    methods: list[str | MethodEntry] = Field(
        min_length=1, description="method names, 'original' (the control), or {label, method, overrides} entries")
    forget: list[str] = Field(min_length=1, description="names of the recipe's forget sets")
    variants: dict[str, list[str] | dict[str, list[str]]] = Field(
        default_factory=lambda: {"default": []},
        description="named override sets (method.*, task.*, eval.*), each crossed with every method; a "
                    "mapping method -> overrides gives each method its own (e.g. twice its own steps)")
    overrides: list[str] = Field(default_factory=list, description="overrides of every erase run of the group")
    attacks: list[AttackStep] = Field(default_factory=list)
    seeds: list[int] | None = Field(None, description="default: the recipe's seeds")
    seedless: bool = Field(False, description="the erase runs do not depend on the seed (retrain: its pretraining "
                           "recipe fixes its own), so each runs once; its attacks still run once per seed")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, entries: list) -> list:
        from diffunlearn.methods import methods

        labels = []
        for entry in entries:
            if isinstance(entry, str) and entry != ORIGINAL:
                methods.check(entry)
            labels.append(entry if isinstance(entry, str) else entry.label)
        if len(set(labels)) != len(labels):
            raise ValueError(f"method label '{next(x for x in labels if labels.count(x) > 1)}' appears twice")
        return entries

    def entries(self) -> list[tuple[str, str, list[str]]]:
        """(label, registered method, the entry's own overrides) of each method."""
        return [(e, e, []) if isinstance(e, str) else (e.label, e.method, list(e.overrides)) for e in self.methods]

    @property
    def labels(self) -> list[str]:
        return [label for label, _, _ in self.entries()]

    @field_validator("variants")
    @classmethod
    def _some_variant(cls, variants: dict) -> dict:
        if not variants:
            raise ValueError("at least one variant (e.g. default: [])")
        return variants

    @model_validator(mode="after")
    def _variant_methods(self) -> Group:
        for name, value in self.variants.items():
            if isinstance(value, dict):
                stray = [m for m in value if m not in self.labels]
                if stray:
                    raise ValueError(f"group '{self.id}', variant '{name}': method '{stray[0]}' is not one of the "
                                     f"group's methods ({', '.join(self.labels)})")
        return self

    def variant_overrides(self, variant: str, method: str) -> list[str]:
        value = self.variants[variant]
        return list(value.get(method, [])) if isinstance(value, dict) else list(value)


class Selection(StrictModel):
    """Rows of the results: each given column must equal the value (or one of the values)."""

    group: str | list[str] | None = None
    variant: str | list[str] | None = None
    method: str | list[str] | None = None
    forget: str | list[str] | None = None
    attack: str | list[str] | None = Field(None, description="attack id; 'none' (default) selects erase runs")

    def values(self, column: str) -> list[str] | None:
        value = getattr(self, column)
        if value is None:
            return None
        return [value] if isinstance(value, str) else list(value)


CLAIM_KINDS = ("greater", "less", "best", "worst", "at_least", "at_most", "rises", "falls", "same")


class Claim(StrictModel):
    """A paper's finding and the comparison over our figures that tests it (bench/claims.py).

    kinds: `greater`/`less` (subject vs other), `best`/`worst` (subject vs each member of
    `among`, told apart by `by`), `at_least`/`at_most` (subject vs `value`), `rises`/`falls`
    (the per-seed change from `other` - or from `from_metric` on the subject's own runs - to
    the subject), `same` (that change stays within +/- `value`: a finding of no effect).
    `per` gives one verdict per value of those columns (e.g. forget).
    """

    id: str
    paper: str = Field(description="where the paper states it, e.g. '[001] Table 1'")
    finding: str = Field(description="the paper's finding in one sentence")
    metric: str
    kind: Literal["greater", "less", "best", "worst", "at_least", "at_most", "rises", "falls", "same"]
    subject: Selection
    other: Selection | None = None
    among: Selection | None = None
    by: Literal["group", "variant", "method", "forget", "attack"] = "method"
    value: float | None = Field(None, description="at_least/at_most: the bound; same: the margin (>= 0)")
    from_metric: str | None = Field(None, description="rises/falls: the subject's metric before (e.g. AR_MU_top1)")
    per: list[Literal["group", "variant", "method", "forget", "attack"]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _operands(self) -> Claim:
        need = {"greater": "other", "less": "other", "best": "among", "worst": "among",
                "at_least": "value", "at_most": "value"}
        if self.kind in need and getattr(self, need[self.kind]) is None:
            raise ValueError(f"claim '{self.id}': kind {self.kind} needs '{need[self.kind]}'")
        if self.kind in ("rises", "falls", "same") and (self.other is None) == (self.from_metric is None):
            raise ValueError(f"claim '{self.id}': kind {self.kind} needs exactly one of 'other' and 'from_metric'")
        if self.kind == "same" and (self.value is None or self.value < 0):
            raise ValueError(f"claim '{self.id}': kind same needs a margin 'value' >= 0")
        return self


class Leaderboard(StrictModel):
    """The columns shown for erase runs and for attack runs (means with 95% intervals over seeds)."""

    erase: list[str] = Field(default_factory=lambda: ["UA", "UA_partial", "IRA", "CRA", "SFID", "Total",
                                                       "train_seconds"])
    attack: list[str] = Field(default_factory=lambda: ["AR_MU_top1", "AR_DiMRA_top1", "AR_DiMRA_top3",
                                                        "AR_CL_min", "retain_acc_after", "travelled_back_fraction"])


class Estimate(StrictModel):
    """The recipe's expected cost, checked by a test against the expansion and bench/costs.yaml."""

    runs: int = Field(ge=1, description="runs in the default expansion (erase, evaluate and attack)")
    minutes: float = Field(gt=0, description="wall minutes with --jobs 2 --threads 1 on 2 free cores, cold caches")
    basis: str = Field(description="what the estimate rests on")


FAST_EVAL = ["eval.images_per_prompt=2", "eval.partial_images=8", "eval.bootstrap=200"]
CONCEPT_SET_KEYS = ("task.concepts", "task.domain")  # one concept set per recipe: its `task:` block


class TaskKeys(StrictModel):
    """The concept set every run of a recipe uses (`task.concepts`, `task.domain`, `task.anchor`
    of each erase, evaluate and attack run; the command line's --concepts/--domain/--anchor
    override them). Unset: the model's own set (the shipped testbeds: canvas), else a free-text
    set of the forget names."""

    concepts: str | None = Field(None, description="concept set: a built-in name or a YAML file (a relative path "
                                 "is read beside the recipe)")
    domain: str | None = Field(None, description="domain of free-text concepts (concept, style, object, ...)")
    anchor: str | None = Field(None, description="text or concept the forget concepts are steered to")

    def options(self) -> dict[str, str]:
        """The given keys, as `resolve_erase(task_options=...)` and the run functions take them."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Recipe(StrictModel):
    # set by `with_concepts`: names this concept set in the grid's node names (`grid.expand`)
    _concept_scope: str = PrivateAttr("")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    description: str
    paper: str
    headline: bool = Field(True, description="a headline experiment of the papers (it must state claims); false "
                           "for documentation grids such as the README's tables")
    model: str | None = Field(None, description="model folder; default: the shipped testbed (--model overrides)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    protocols: dict[str, list[str]] = Field(
        default_factory=lambda: {"fast": list(FAST_EVAL), "full": []},
        description="named evaluation override sets; `fast` is the default, `full` the testbed's full protocol")
    overrides: list[str] = Field(default_factory=list, description="every run: each goes to the runs whose "
                                 "kind accepts its section (method.* erase, attack.* attack, eval.*/seed both)")
    task: TaskKeys = Field(default_factory=TaskKeys, description="the concept set of every run")
    forget_sets: dict[str, list[str]] = Field(
        min_length=1, description="named lists of concepts of the recipe's concept set (checked against it when the "
                                  "recipe expands, since the set depends on the model)")
    attacks: list[AttackStep] = Field(
        default_factory=list, description="attacks that several groups run: a group lists one by its id")
    groups: list[Group] = Field(min_length=1)
    claims: list[Claim] = Field(default_factory=list)
    leaderboard: Leaderboard = Field(default_factory=Leaderboard)
    estimate: Estimate

    @model_validator(mode="before")
    @classmethod
    def _shared_attacks(cls, data):
        """A group's attack given as a string, or as `{use: ID, methods: ..., variants: ...}`, is
        the recipe-level attack of that id (one definition however many groups run it), in the
        second form restricted to some of the group's methods or variants."""
        if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
            return data
        shared = {a.get("id"): a for a in data.get("attacks") or [] if isinstance(a, dict)}
        groups = [{**g, "attacks": [_shared_step(step, shared, g.get("id")) for step in g["attacks"]]}
                  if isinstance(g, dict) and isinstance(g.get("attacks"), list) else g for g in data["groups"]]
        return {**data, "groups": groups}

    @model_validator(mode="after")
    def _references(self) -> Recipe:
        if "fast" not in self.protocols:
            raise ValueError("protocols must define 'fast' (the default)")
        for name, concepts in self.forget_sets.items():
            if not concepts:
                raise ValueError(f"forget set '{name}' is empty")
            if len(set(concepts)) != len(concepts):
                raise ValueError(f"forget set '{name}' repeats a concept")
        shared = [a.id for a in self.attacks]
        if len(set(shared)) != len(shared):
            raise ValueError(f"duplicate attack id '{next(i for i in shared if shared.count(i) > 1)}'")
        ids = [g.id for g in self.groups]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate group id '{next(i for i in ids if ids.count(i) > 1)}'")
        for group in self.groups:
            for name in group.forget:
                if name not in self.forget_sets:
                    raise ValueError(f"group '{group.id}': unknown forget set '{name}'; "
                                     f"defined: {', '.join(self.forget_sets)}")
            attack_ids = [a.id for a in group.attacks]
            if len(set(attack_ids)) != len(attack_ids):
                raise ValueError(f"group '{group.id}': duplicate attack id")
            for step in group.attacks:
                stray = [m for m in step.methods or [] if m not in group.labels]
                if stray:
                    raise ValueError(f"group '{group.id}', attack '{step.id}': method '{stray[0]}' is not one of the "
                                     f"group's methods ({', '.join(group.labels)})")
                stray = [v for v in step.variants or [] if v not in group.variants]
                if stray:
                    raise ValueError(f"group '{group.id}', attack '{step.id}': variant '{stray[0]}' is not one of "
                                     f"the group's variants ({', '.join(group.variants)})")
        claim_ids = [c.id for c in self.claims]
        if len(set(claim_ids)) != len(claim_ids):
            raise ValueError(f"duplicate claim id '{next(i for i in claim_ids if claim_ids.count(i) > 1)}'")
        for claim in self.claims:
            self._check_claim(claim)
        return self

    def labels(self, column: str) -> set[str]:
        """Every value a results column can take in this recipe."""
        if column == "group":
            return {g.id for g in self.groups}
        if column == "variant":
            return {v for g in self.groups for v in g.variants}
        if column == "method":
            return {m for g in self.groups for m in g.labels}
        if column == "forget":
            return set(self.forget_sets)
        return {"none"} | {a.id for g in self.groups for a in g.attacks}

    def _check_claim(self, claim: Claim) -> None:
        from diffunlearn.bench.extract import attack_only, check_metric

        for metric in (claim.metric, claim.from_metric):
            if metric is not None:
                check_metric(metric, f"claim '{claim.id}'")
        for role in ("subject", "other", "among"):
            selection: Selection | None = getattr(claim, role)
            if selection is None:
                continue
            if selection.attack is None and attack_only(claim.metric):
                # an unset attack selects erase runs, which never have this figure: every slice would be `no data`
                raise ValueError(f"claim '{claim.id}': {claim.metric} is a figure of attack runs, but {role} selects "
                                 "erase runs; give its attack (e.g. attack: [relearn-i, relearn-ii])")
            for column in SELECTION_COLUMNS:
                for value in selection.values(column) or []:
                    if value not in self.labels(column):
                        raise ValueError(f"claim '{claim.id}': {role}.{column} '{value}' is not in the recipe; "
                                         f"valid: {', '.join(sorted(self.labels(column)))}")


def _shared_step(step, shared: dict, group: str | None):
    """A group's attack entry with any reference to a recipe-level attack filled in."""
    if isinstance(step, dict) and "use" in step:
        stray = sorted(set(step) - {"use", "methods", "variants"})
        if stray:
            raise ValueError(f"group '{group}', attack '{step['use']}': a shared attack takes only 'methods' and "
                             f"'variants' beside 'use' (got '{stray[0]}')")
        restrictions = {k: v for k, v in step.items() if k != "use"}
        step = step["use"]
    elif isinstance(step, str):
        restrictions = {}
    else:
        return step
    if not isinstance(step, str) or step not in shared:
        known = ", ".join(str(k) for k in shared) or "none"
        raise ValueError(f"group '{group}': attack '{step}' is not one of the recipe's attacks ({known})")
    return {**shared[step], **restrictions}


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """A shipped recipe by name, or a YAML file; ConfigError (one line, did-you-mean) otherwise."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path
    names = shipped_recipes()
    if str(name_or_path) not in names:
        import difflib

        close = difflib.get_close_matches(str(name_or_path), names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown recipe '{name_or_path}'{hint}; shipped recipes: {', '.join(names)} "
                          "(or give a YAML file)")
    return RECIPE_DIR / f"{name_or_path}.yaml"


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load and validate a recipe; raises ConfigError with one line (unknown names included)."""
    from diffunlearn.data.tasks import TaskError
    from diffunlearn.registry import UnknownNameError

    path = recipe_path(name_or_path)
    data = load_yaml(path)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"recipe {path.name}: {one_line(err)}") from None
    except (TaskError, UnknownNameError) as err:
        raise ConfigError(f"recipe {path.name}: {err}") from None
    concepts = recipe.task.concepts
    if concepts and not Path(concepts).is_absolute() and (path.parent / concepts).is_file():
        # a concept-set file named by the recipe is read beside it, wherever the runs start
        recipe.task = recipe.task.model_copy(update={"concepts": str((path.parent / concepts).resolve())})
    return recipe


def with_concepts(recipe: Recipe, concepts: str | None = None, domain: str | None = None, anchor: str | None = None,
                  forget_sets: dict[str, list[str]] | None = None) -> Recipe:
    """The recipe on another concept set (a real model's): the given task keys replace the
    recipe's `task:` block, each of `forget_sets` replaces the recipe's set of that name (the
    groups and claims keep referring to it by name). ConfigError with one line."""
    unknown = [name for name in forget_sets or {} if name not in recipe.forget_sets]
    if unknown:
        raise ConfigError(f"recipe {recipe.name} has no forget set '{unknown[0]}'; its sets: "
                          f"{', '.join(recipe.forget_sets)}")
    if concepts and Path(concepts).is_file():
        concepts = str(Path(concepts).resolve())  # the runs may start elsewhere (Ray, Slurm)
    task = recipe.task.model_dump() | {k: v for k, v in {"concepts": concepts, "domain": domain,
                                                           "anchor": anchor}.items() if v is not None}
    data = recipe.model_dump() | {"task": task, "forget_sets": recipe.forget_sets | dict(forget_sets or {})}
    try:
        moved = Recipe.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"recipe {recipe.name}: {one_line(err)}") from None
    if moved.task == recipe.task and moved.forget_sets == recipe.forget_sets:
        return recipe  # the flags repeat the recipe's own concept set: its own runs, found done
    # the groups and claims keep their labels, but node names (the store's and the record files' keys)
    # name the concept set, so a grid on it never replaces the recipe's own rows
    moved._concept_scope = f"concepts-{config_hash({'task': task, 'forget_sets': moved.forget_sets})[:8]}:"
    return moved


def one_line(err: ValidationError) -> str:
    """The first error of a recipe: where, and why (the input only when it is short)."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "recipe"
    if first["type"] == "extra_forbidden":
        return f"unknown key '{where}'"
    message = first["msg"].removeprefix("Value error, ")
    shown = first.get("input")
    if isinstance(shown, str | int | float) and len(repr(shown)) <= 60:
        return f"bad value for '{where}': {message} (got {shown!r})"
    return f"bad value for '{where}': {message}" if where != "recipe" else message
