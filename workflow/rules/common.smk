# Helpers shared by the rules: config validation, tracking set-up, paths and JSON params.
# No logic beyond wiring: everything a job does is one `robustify ...` command.
import json
import os
import re
import uuid

from robustify.config import run_params, selected_runs, validate_params
from robustify.corruptions.names import corruption_names, perturbation_names
from robustify.data.registry import corrupted_type


def runs_regex(runs):
    """A wildcard constraint matching exactly these run names (never matches when there are none)."""
    return "|".join(re.escape(r) for r in runs) or r"(?!)"


# Fails before any job runs, naming the offending key (e.g. "unknown key pretrain.stepz").
validate_params(
    config, workflow.source_path("../schemas/params.schema.yaml"), source="config"
)

# Job environment. One id per invocation, shared by every job's MLflow run; the parent run id is
# filled in by `onstart`. Experiment name and device reach the jobs through the environment so that
# changing them never reruns a job. `envvars` makes Snakemake forward them to cluster jobs.
os.environ.setdefault("ROBUSTIFY_PIPELINE_RUN_ID", uuid.uuid4().hex[:12])
os.environ.setdefault("ROBUSTIFY_PARENT_RUN_ID", "")
os.environ.update(
    ROBUSTIFY_EXPERIMENT=config["tracking"]["experiment"],
    ROBUSTIFY_DEVICE=config["device"],
)
os.environ.pop("MLFLOW_RUN_ID", None)  # DESIGN §4: a job must never resume another run
# Jobs spool their MLflow runs here (one small file each, no MLflow import in the job); onsuccess /
# onerror load them into the store (robustify.tracking). `tracking.spool: false` logs live instead.
os.environ["ROBUSTIFY_TRACKING_SPOOL"] = (
    os.path.abspath(".robustify/tracking-spool") if config["tracking"]["spool"] else ""
)


envvars:
    "ROBUSTIFY_PIPELINE_RUN_ID",
    "ROBUSTIFY_PARENT_RUN_ID",
    "ROBUSTIFY_EXPERIMENT",
    "ROBUSTIFY_DEVICE",
    "ROBUSTIFY_TRACKING_SPOOL",


wildcard_constraints:
    # only keys of `datasets:` are prepared (never matches when there are none)
    dataset="|".join(re.escape(k) for k in config["datasets"]) or r"(?!)",
    model=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    eval_set=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    cset="|".join(re.escape(k) for k in config["corrupt"]) or r"(?!)",
    pset="|".join(re.escape(k) for k in config["perturb"]) or r"(?!)",
    perturbation=r"[a-z_]+",
    corruption=r"[a-z_]+",
    severity=r"[1-5]",
    shard=r"\d+",
    # per-set evaluation of start points (zero-shot, imported timm); trained models: evaluate_tuned
    clf=r"(zeroshot|timm)/[A-Za-z0-9][A-Za-z0-9_.-]*",
    run=runs_regex(selected_runs(config["finetune"])),
    drun=runs_regex(selected_runs(config["distill"])),
    teacher=runs_regex(config["teachers"]),
    seed=r"\d+",
    alpha=r"[0-9.]+",


onstart:
    # Creates mlflow.db once (it is never a DAG input or output), loads runs an interrupted invocation
    # left in the spool, and opens the parent run.
    os.environ["ROBUSTIFY_PARENT_RUN_ID"] = (
        shell("robustify tracking init", read=True).strip().splitlines()[-1]
    )


onsuccess:
    # Loads the jobs' spooled runs into MLflow, then closes the parent run.
    shell(
        "robustify tracking finish --run-id $ROBUSTIFY_PARENT_RUN_ID --status FINISHED"
    )


onerror:
    shell("robustify tracking finish --run-id $ROBUSTIFY_PARENT_RUN_ID --status FAILED")


def as_json(value):
    """A params section as compact, key-sorted JSON: the rule's rerun trigger and the CLI's input."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def dataset_root(key):
    """Where a dataset's prepared files live: the generated mini-world, or data/<key>/."""
    return config["miniworld"]["root"] if key == "miniworld" else f"data/{key}"


def dataset_manifest(key):
    return f"{dataset_root(key)}/manifest.parquet"


def dataset_type(key):
    """The registered class that reads a dataset; a corrupted set is read by its source's class for
    corrupted data (ObjectNet → objectnet-c: the border was cropped before corrupting).
    """
    for section in ("corrupt", "perturb"):
        if key in config[section]:
            return corrupted_type(dataset_type(config[section][key]["dataset"]))
    return "miniworld" if key == "miniworld" else config["datasets"][key]["type"]


def dataset_options(key):
    for section in ("corrupt", "perturb"):
        if key in config[section]:
            return dataset_options(config[section][key]["dataset"])
    return {} if key == "miniworld" else config["datasets"][key].get("options", {})


def corrupt_shards(cset):
    spec = config["corrupt"][cset]
    names = corruption_names(spec["corruptions"])
    return [
        f"data/{cset}/shards/{c}/{s}/{k}.parquet"
        for c in names
        for s in spec["severities"]
        for k in range(spec["shards"])
    ]


def under(root, path):
    """`path` as given if absolute, else inside `root` (paths.data / paths.checkpoints)."""
    return path if os.path.isabs(path) else os.path.join(root, path)


def dataset_source(key):
    return under(config["paths"]["data"], config["datasets"][key]["source"])


def model_checkpoint(name):
    """A model's weights: its configured path, or this pipeline's pre-training output."""
    ckpt = config["models"][name]["checkpoint"]
    if ckpt is None:
        return f"models/pretrained/{name}/model.safetensors"
    return under(config["paths"]["checkpoints"], ckpt)


def resources_for(stage):
    r = config["resources"][stage]
    return {"mem_mb": r["mem_mb"], "runtime": r["runtime"], "gpu": r["gpu"]}


def zeroshot_spec(w):
    """models.<name> with the checkpoint resolved to a file (given, or pre-trained here)."""
    return as_json(
        {**config["models"][w.model], "checkpoint": model_checkpoint(w.model)}
    )


def pretrained_on(w):
    return (
        config["pretrain"]["dataset"]
        if config["models"][w.model]["checkpoint"] is None
        else "external"
    )


ZEROSHOT_CLASSIFIERS = [f"zeroshot/{m}" for m in config["zeroshot"]["models"]]


def selected_eval_sets():
    sets = config["evaluate"]["sets"]
    return list(config["eval_sets"]) if sets == "all" else sets


def clean_sets():
    """{corrupted eval set: its clean counterpart} among the sets this run evaluates."""
    chosen = selected_eval_sets()
    return {
        name: config["eval_sets"][name]["clean"]
        for name in chosen
        if config["eval_sets"][name].get("clean") in chosen
    }


def perturb_shards(pset):
    spec = config["perturb"][pset]
    names = perturbation_names(spec["perturbations"])
    return [
        f"data/{pset}/shards/{p}/{k}.parquet"
        for p in names
        for k in range(spec["shards"])
    ]


# ---------------------------------------------------------------- fine-tuning and post-hoc
FT = config["finetune"]
FT_MODEL = FT["model"]
FT_RUNS = selected_runs(FT) if FT_MODEL is not None else {}
POSTHOC = config["posthoc"]
WISE_ALPHAS = [
    f"{a:g}" for a in POSTHOC["wise"]["alphas"]
]  # as the CLI names them: a0.25
SOUP_KINDS = POSTHOC["soups"]["kinds"] if FT_RUNS else []
# runs whose evaluation job also sweeps WiSE-FT α (the others are evaluated alone)
WISE_RUNS = [
    r
    for r in FT_RUNS
    if WISE_ALPHAS
    and (POSTHOC["wise"]["runs"] == "all" or r in POSTHOC["wise"]["runs"])
]
FT_EVAL_SETS = (
    list(config["eval_sets"]) if FT["eval_sets"] == "all" else FT["eval_sets"]
)


def run_seeds(run):
    return FT_RUNS[run].get("seeds", [0])


def run_recipe(run):
    """finetune.recipe with the run's overrides."""
    return {**FT["recipe"], **FT_RUNS[run].get("recipe", {})}


def finetuned_ids():
    return [
        f"ft/{FT_MODEL}/{run}/s{seed}" for run in FT_RUNS for seed in run_seeds(run)
    ]


def posthoc_ids():
    """Model ids of the post-hoc classifiers (TPGM, TPGM-C, soups); their dirs: models/posthoc/<id>/."""
    ids = [
        f"{kind}/{FT_MODEL}/{run}/s{seed}"
        for kind in ("tpgm", "tpgm-c")
        for run in (POSTHOC[kind]["runs"] if FT_RUNS else [])
        for seed in POSTHOC[kind]["seeds"]
    ]
    return ids + [
        f"{kind}/{FT_MODEL}/{run}"
        for kind in SOUP_KINDS
        for run in POSTHOC["soups"]["runs"]
    ]


def eval_sets_json(names):
    """{eval set: its spec, prepared root, reading class and options}: the CLI's --sets."""
    out = {}
    for name in names:
        key = config["eval_sets"][name]["dataset"]
        spec = {k: v for k, v in config["eval_sets"][name].items() if k != "clean"}
        out[name] = {
            "eval_set": spec,
            "root": dataset_root(key),
            "type": dataset_type(key),
            "options": dataset_options(key),
        }
    return as_json(out)


def tuned_metric_files():
    files = [
        f"results/metrics/{clf}/{name}.parquet"
        for clf in finetuned_ids() + posthoc_ids()
        for name in FT_EVAL_SETS
    ]
    return files + [
        f"results/metrics/wise/{FT_MODEL}/{run}/s{seed}/a{a}/{name}.parquet"
        for run in WISE_RUNS
        for seed in run_seeds(run)
        for a in WISE_ALPHAS
        for name in FT_EVAL_SETS
    ]


def metric_files():
    return (
        [
            f"results/metrics/{clf}/{name}.parquet"
            for clf in ZEROSHOT_CLASSIFIERS
            for name in selected_eval_sets()
        ]
        + tuned_metric_files()
        + distill_metric_files()
        + timm_start_metric_files()
    )


def val_args():
    """The validation split post-hoc methods fit on (finetune.val_split, never a test split)."""
    domain = f" --domain {FT['domain']}" if FT["domain"] else ""
    return (
        f"--dataset-root {dataset_root(FT['dataset'])} --dataset-type {dataset_type(FT['dataset'])}"
        f" --dataset-options '{as_json(dataset_options(FT['dataset']))}'"
        f" --val-split {FT['val_split']}{domain}"
    )


def is_timm(model):
    return config["models"][model]["family"] == "timm"


def start_classifier(model):
    """The classifier directory a fine-tuning or distillation run of `model` starts from: a CLIP's
    zero-shot classifier, or a timm model's own pre-trained classifier imported as timm/<model>.
    """
    return f"models/timm/{model}" if is_timm(model) else f"models/zeroshot/{model}"


def energy_gap_args():
    """finetune.energy_gap and, for the `seen` token pool, the captions it draws from (none for a timm
    start: the gap is measured against CLIP's text tower)."""
    if FT_MODEL is not None and is_timm(FT_MODEL):
        return ""
    gap = FT["energy_gap"]
    args = f"--energy-gap '{as_json(gap)}'"
    if gap["vocab"] == "seen":
        args += (
            f" --corpus-root {dataset_root(FT['dataset'])} --corpus-type {dataset_type(FT['dataset'])}"
            f" --corpus-split {FT['corpus_split']}"
        )
    return args


# ---------------------------------------------------------------- teachers and distillation (SPEC §3)
DISTILL = config["distill"]
DISTILL_RUNS = selected_runs(DISTILL) if DISTILL["student"] is not None else {}
DISTILL_STUDENT = DISTILL["student"]
# only the teacher the distillation uses is trained
TEACHERS = [DISTILL["teacher"]] if DISTILL_RUNS else []
DISTILL_EVAL_SETS = (
    list(config["eval_sets"]) if DISTILL["eval_sets"] == "all" else DISTILL["eval_sets"]
)


def distill_seeds(run):
    return DISTILL_RUNS[run].get("seeds", [0])


def distill_recipe(run):
    return {**DISTILL["recipe"], **DISTILL_RUNS[run].get("recipe", {})}


def distill_params(run):
    return run_params(DISTILL, DISTILL_RUNS[run])


def timm_start_metric_files():
    """Imported timm start points (paper Table 3's "Standard training" row) on the eval sets of the
    stages that start from them, one job per set as for zero-shot classifiers."""
    starts = [(FT_MODEL, FT_EVAL_SETS)] if FT_RUNS else []
    starts += [(DISTILL_STUDENT, DISTILL_EVAL_SETS)] if DISTILL_RUNS else []
    files = [
        f"results/metrics/timm/{model}/{name}.parquet"
        for model, sets in starts
        if is_timm(model)
        for name in sets
    ]
    return list(dict.fromkeys(files))


def timm_start_dataset(model):
    """The dataset whose label space an imported timm start point must have (the stage it starts)."""
    return FT["dataset"] if FT_RUNS and model == FT_MODEL else DISTILL["dataset"]


def model_spec_resolved(name):
    """models.<name> with a configured checkpoint resolved under paths.checkpoints."""
    spec = dict(config["models"][name])
    if spec["checkpoint"] is not None:
        spec["checkpoint"] = under(config["paths"]["checkpoints"], spec["checkpoint"])
    return spec


def distilled_ids():
    return [
        f"distill/{DISTILL_STUDENT}/{DISTILL['teacher']}/{run}/s{seed}"
        for run in DISTILL_RUNS
        for seed in distill_seeds(run)
    ]


def teacher_ids():
    return [f"teachers/{t}" for t in TEACHERS]


def teacher_spec(name):
    """models.<teacher's model> with a configured checkpoint resolved under paths.checkpoints."""
    return model_spec_resolved(config["teachers"][name]["model"])


def distill_metric_files():
    files = [
        f"results/metrics/{clf}/{name}.parquet"
        for clf in distilled_ids() + teacher_ids()
        for name in DISTILL_EVAL_SETS
    ]
    return files + [
        f"results/metrics/{clf}/cost.parquet"
        for clf in distilled_ids() + teacher_ids() + finetuned_ids()
    ]
