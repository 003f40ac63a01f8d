"""Typed, validated view of params.yaml.

Snakemake validates the whole file against `workflow/schemas/params.schema.yaml` before any job
runs (through `validate_params`, which names the offending key). Each CLI command then receives
only its own section as JSON and turns it into one of the dataclasses below, so a method never
reads params.yaml and a stale or hand-written argument still fails with the key named.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import yaml

SCHEMA_RELPATH = Path("workflow/schemas/params.schema.yaml")


class ConfigError(ValueError):
    """A params file or section is malformed; the message names the source and the key."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge like Snakemake's `--configfile`: nested mappings merge, everything else replaces."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator in ("oneOf", "anyOf") and error.context:
        # "not valid under any of the given schemas" hides the key: report the deepest failure, or
        # every alternative when they all fail at this key.
        depth = max(len(e.absolute_path) for e in error.context)
        deepest = [e for e in error.context if len(e.absolute_path) == depth]
        if len(deepest) > 1:
            return f"{_key_path(deepest[0])}: " + " or ".join(e.message for e in deepest)
        error = deepest[0]
    where = _key_path(error)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        keys = ", ".join(f"{where}.{k}" if where != "<top level>" else k for k in extra)
        hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
        return f"unknown key {keys}{hint}"
    if error.validator == "required":
        return f"{where}: {error.message}"
    return f"{where}: {error.message}"


def validate_params(
    params: Mapping[str, Any], schema_path: str | Path = SCHEMA_RELPATH, source: str = "params.yaml"
) -> None:
    """Validate against the JSON schema, then the cross-references a schema cannot express."""
    schema = load_yaml(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(dict(params)), key=lambda e: list(e.absolute_path))
    if errors:
        lines = "\n  ".join(_describe(e) for e in errors)
        raise ConfigError(f"{source}: invalid configuration:\n  {lines}")
    problems = _cross_reference_problems(params)
    if problems:
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(problems))


def _cross_reference_problems(p: Mapping[str, Any]) -> list[str]:
    from robustify.data.registry import dataset_names  # local: data layer imports config

    models = set(p["models"])
    registered = set(dataset_names())
    sources = {"miniworld", *p["datasets"]}  # what can be corrupted: miniworld or datasets.*
    known = {*sources, *p["corrupt"], *p["perturb"]}  # eval/label datasets: those and the sets built here
    out = []
    for section_name in ("corrupt", "perturb"):
        for key, spec in p[section_name].items():
            if key in sources or (section_name == "perturb" and key in p["corrupt"]):
                owner = "the mini-world" if key == "miniworld" else "datasets." + key if key in sources else "corrupt." + key
                out.append(f"{section_name}.{key}: the name is taken by {owner}")
            if spec["dataset"] not in sources:
                out.append(f"{section_name}.{key}.dataset: '{spec['dataset']}' is neither miniworld nor a key of datasets "
                           f"({sorted(sources)})")
            if (spec["resize"] is None) != (spec["crop"] is None):
                out.append(f"{section_name}.{key}: resize and crop are both set (256, 224) or both null (native size)")
    for key, spec in p["datasets"].items():
        if spec["type"] not in registered or spec["type"] == "miniworld":
            out.append(f"datasets.{key}.type: unknown dataset type '{spec['type']}' (registered: {sorted(registered - {'miniworld'})})")
    if p["pretrain"]["model"] not in models:
        out.append(f"pretrain.model: '{p['pretrain']['model']}' is not defined under models")
    for m in p["zeroshot"]["models"]:
        if m not in models:
            out.append(f"zeroshot.models: '{m}' is not defined under models")
        elif p["models"][m]["family"] != "open_clip":
            out.append(f"zeroshot.models: '{m}' is a {p['models'][m]['family']} model; zero-shot heads need open_clip")
        elif p["models"][m]["checkpoint"] is None and m != p["pretrain"]["model"]:
            out.append(
                f"models.{m}.checkpoint: null means 'pre-trained by this pipeline', but pretrain.model is "
                f"'{p['pretrain']['model']}'; give '{m}' a checkpoint path"
            )
    if p["zeroshot"]["dataset"] not in known:
        out.append(f"zeroshot.dataset: '{p['zeroshot']['dataset']}' is neither miniworld nor a key of datasets ({sorted(known)})")
    mw = p["miniworld"]
    if mw["reference_domain"] not in mw["domains"]:
        out.append(f"miniworld.reference_domain: '{mw['reference_domain']}' is not in miniworld.domains")
    for name, spec in p["eval_sets"].items():
        if spec["dataset"] not in known:
            out.append(f"eval_sets.{name}.dataset: '{spec['dataset']}' is neither miniworld nor a key of datasets, corrupt or perturb ({sorted(known)})")
        elif spec["dataset"] == "miniworld" and spec.get("domain") not in mw["domains"]:
            out.append(f"eval_sets.{name}.domain: '{spec.get('domain')}' is not in miniworld.domains")
        if spec.get("clean") is not None and spec["clean"] not in p["eval_sets"]:
            out.append(f"eval_sets.{name}.clean: '{spec['clean']}' is not defined under eval_sets")
    er = p.get("report", {}).get("effective_robustness", {})
    if er.get("reference") is not None and er["reference"] not in p["eval_sets"]:
        out.append(f"report.effective_robustness.reference: '{er['reference']}' is not defined under eval_sets")
    sets = p["evaluate"]["sets"]
    for name in [] if sets == "all" else sets:
        if name not in p["eval_sets"]:
            out.append(f"evaluate.sets: '{name}' is not defined under eval_sets")
    return out + _finetune_problems(p, known) + _distill_problems(p, known)


# Methods that need a CLIP start point: Lipsum-FT reads the text tower, CAR-FT and ZS-FT the zero-shot
# head's prompt embeddings, VPT wraps a bare open_clip / timm tower (not a timm classifier's TimmEncoder).
CLIP_START_METHODS = frozenset({"lipsum-ft", "car-ft", "zs-ft", "vpt-shallow", "vpt-deep"})


# The partial-tuning family ("Efficiently Robustify") takes distill.defaults (fraction tuned, a, dropout,
# augmentation, ...); the other distill runs (VPT, ZS-FT) take only their own params.
PARTIAL_METHODS = frozenset({"three-head", "three-head-no-kd", "single-teacher", "only-kd", "combined-head", "apt"})


def run_params(section: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, Any]:
    """The method params a run of `section` (finetune or distill) trains with: its own over the section's
    `defaults` when its method takes them."""
    base = (section.get("defaults") or {}) if run["method"] in PARTIAL_METHODS else {}
    return {**base, **(run.get("params") or {})}


def selected_runs(finetune: Mapping[str, Any]) -> dict[str, Any]:
    """finetune.runs restricted to finetune.select (all, or the listed keys)."""
    runs, select = finetune["runs"], finetune["select"]
    return dict(runs) if select == "all" else {k: v for k, v in runs.items() if k in select}


def _finetune_problems(p: Mapping[str, Any], known: set[str]) -> list[str]:
    """finetune/posthoc references: the start model, label space, sets, and the runs post-hoc methods use."""
    ft, post = p["finetune"], p["posthoc"]
    out = _select_problems(ft, "finetune")
    runs = selected_runs(ft)
    if ft["model"] is None or not runs:
        return out
    model = p["models"].get(ft["model"])
    if model is not None and model["family"] == "timm":  # unimodal (paper Table 3): FT / LP / WiSE-FT from its own head
        out += _timm_start_problems(p, "finetune", "model", known)
        if ft["corpus_split"] is not None:
            out.append(f"finetune.corpus_split: '{ft['corpus_split']}' feeds Lipsum-FT's text tower; a timm start "
                       f"('{ft['model']}') has none (set it to null)")
        out += [f"posthoc.{kind}.runs: {post[kind]['runs']} — {kind} is not supported from a timm start "
                f"('{ft['model']}'): its jobs read a CLIP zero-shot classifier (set runs: [])"
                for kind in ("tpgm", "tpgm-c", "soups") if post[kind]["runs"]]
    else:
        out += _start_problems(p, "finetune", "model", known, "the zero-shot head's label space is the one fine-tuned")
    seeds = {run: spec.get("seeds", [0]) for run, spec in runs.items()}
    for kind in ("tpgm", "tpgm-c"):
        for run in post[kind]["runs"]:
            if run not in runs:
                out.append(f"posthoc.{kind}.runs: '{run}' is not a selected key of finetune.runs ({sorted(runs)})")
            else:
                missing = sorted(set(post[kind]["seeds"]) - set(seeds[run]))
                if missing:
                    out.append(f"posthoc.{kind}.seeds: {missing} are not seeds of finetune.runs.{run} ({seeds[run]})")
    wise_runs = post["wise"]["runs"]
    for run in [] if wise_runs == "all" or not post["wise"]["alphas"] else wise_runs:
        if run not in runs:
            out.append(f"posthoc.wise.runs: '{run}' is not a selected key of finetune.runs ({sorted(runs)})")
    for run in post["soups"]["runs"] if post["soups"]["kinds"] else []:
        if run not in runs:
            out.append(f"posthoc.soups.runs: '{run}' is not a selected key of finetune.runs ({sorted(runs)})")
        elif len(seeds[run]) < 2:
            out.append(f"posthoc.soups.runs: '{run}' has {len(seeds[run])} seed; a soup needs at least 2 "
                       f"(finetune.runs.{run}.seeds)")
    return out


def _distill_problems(p: Mapping[str, Any], known: set[str]) -> list[str]:
    """teachers/distill references: the teacher's timm model, the student's zero-shot classifier, sets."""
    d = p["distill"]
    out = _select_problems(d, "distill")
    for name, t in p["teachers"].items():
        model = p["models"].get(t["model"])
        if model is None:
            out.append(f"teachers.{name}.model: '{t['model']}' is not a key of models ({sorted(p['models'])})")
        elif model["family"] != "timm":
            out.append(f"teachers.{name}.model: '{t['model']}' is a {model['family']} model; teachers are timm models")
    for name, m in p["models"].items():
        if "image_size" in m and m["family"] != "timm":
            out.append(f"models.{name}.image_size: only timm models take an input size (open_clip's comes from its config)")
    if d["student"] is None or not selected_runs(d):
        return out
    if d["teacher"] not in p["teachers"]:
        out.append(f"distill.teacher: '{d['teacher']}' is not a key of teachers ({sorted(p['teachers'])})")
    for name in selected_runs(d):
        run = d["runs"][name]
        augment = {**d["recipe"], **(run.get("recipe") or {})}.get("augment")
        if run_params(d, run).get("cache_prefix") and augment != "none":
            out.append(f"distill.runs.{name}: cache_prefix needs recipe augment: none (a cached clean row must be "
                       f"the same image every epoch), got '{augment}'")
    student = p["models"].get(d["student"])
    if student is not None and student["family"] == "timm":  # unimodal (paper Table 3): its own pre-trained head
        return out + _timm_start_problems(p, "distill", "student", known)
    return out + _start_problems(p, "distill", "student", known, "the student's zero-shot head defines the label space")


def _timm_start_problems(p: Mapping[str, Any], name: str, model_key: str, known: set[str]) -> list[str]:
    """A timm model starts from its checkpoint's classifier (`import-timm`): it needs the weights, and no
    run may need CLIP's text tower or zero-shot head."""
    sec, out = p[name], []
    model = sec[model_key]
    if p["models"][model]["checkpoint"] is None:
        out.append(f"{name}.{model_key}: timm model '{model}' has no checkpoint (models.{model}.checkpoint: a "
                   "pre-trained start point needs its weights)")
    for run_name, run in selected_runs(sec).items():
        params = run_params(sec, run)
        if run["method"] in CLIP_START_METHODS or params.get("setup") == "zeroshot":
            out.append(f"{name}.runs.{run_name}: method '{run['method']}' (setup {params.get('setup', 'visual')}) needs "
                       f"a CLIP start point; {name}.{model_key} '{model}' is a timm model")
    return out + _data_problems(p, name, known)


def _select_problems(section: Mapping[str, Any], name: str) -> list[str]:
    """`<name>.select` entries that are not keys of `<name>.runs`."""
    return [f"{name}.select: '{r}' is not a key of {name}.runs ({sorted(section['runs'])})"
            for r in ([] if section["select"] == "all" else section["select"]) if r not in section["runs"]]


def _start_problems(p: Mapping[str, Any], name: str, model_key: str, known: set[str], why: str) -> list[str]:
    """A stage that starts from a zero-shot classifier: its model has one, its dataset is the zero-shot label
    space and is known, its eval sets are defined (finetune and distill share these rules)."""
    sec, zs, out = p[name], p["zeroshot"], []
    if sec[model_key] not in zs["models"]:
        out.append(f"{name}.{model_key}: '{sec[model_key]}' has no zero-shot classifier (zeroshot.models: {zs['models']})")
    if sec["dataset"] != zs["dataset"]:
        out.append(f"{name}.dataset: '{sec['dataset']}' differs from zeroshot.dataset '{zs['dataset']}' ({why})")
    return out + _data_problems(p, name, known)


def _data_problems(p: Mapping[str, Any], name: str, known: set[str]) -> list[str]:
    """`<name>.dataset` is known and `<name>.eval_sets` are defined."""
    sec, out = p[name], []
    if sec["dataset"] not in known:
        out.append(f"{name}.dataset: '{sec['dataset']}' is neither miniworld nor a key of datasets ({sorted(known)})")
    out += [f"{name}.eval_sets: '{s}' is not defined under eval_sets"
            for s in ([] if sec["eval_sets"] == "all" else sec["eval_sets"]) if s not in p["eval_sets"]]
    return out


def load_params(*paths: str | Path, schema_path: str | Path = SCHEMA_RELPATH) -> dict[str, Any]:
    """Load params.yaml plus overrides (later files win, nested keys merge) and validate."""
    merged: dict[str, Any] = {}
    for path in paths:
        merged = deep_merge(merged, load_yaml(path))
    validate_params(merged, schema_path, source=" + ".join(str(p) for p in paths))
    return merged


# ---------------------------------------------------------------- typed sections
T = TypeVar("T")


def section(cls: type[T], data: Mapping[str, Any] | str, where: str) -> T:
    """Build dataclass `cls` from a mapping (or its JSON), naming unknown or missing keys."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: expected a JSON object ({e})") from e
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(fields)})")
    missing = [
        n
        for n, f in fields.items()
        if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    return cls(**data)


@dataclasses.dataclass(frozen=True)
class MiniWorldConfig:
    root: str
    classes: list[str]
    domains: list[str]
    reference_domain: str
    render_size: int
    image_size: int
    pretrain_pairs: int
    train: int
    val: int
    test_per_domain: int
    generic_noun_rate: float
    wrong_shape_rate: float
    workers: int = 1


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """DESIGN §3: `{family, arch, checkpoint}`; checkpoint None means random init."""

    family: str
    arch: str
    checkpoint: str | None = None


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    model: str
    dataset: str
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    shift_px: int
    checkpoint_every: int


@dataclasses.dataclass(frozen=True)
class ZeroShotConfig:
    dataset: str
    templates: list[str] | str  # a list of "...{}..." strings, or "openai_imagenet"
    models: list[str] = dataclasses.field(default_factory=list)  # wiring only; a job builds one head


@dataclasses.dataclass(frozen=True)
class EvalSetSpec:
    dataset: str
    split: str
    shift_type: str
    domain: str | None = None
    clean: str | None = None  # report only: the uncorrupted counterpart, for relative mCE


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int
    ece_bins: int
    workers: int | str = 0  # decode workers, or "auto" (eval.loader.default_eval_workers)
    sets: list[str] | str = "all"  # wiring only: which eval sets the DAG runs
