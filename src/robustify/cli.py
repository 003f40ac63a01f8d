"""`robustify <stage> ...`: the one command each Snakemake rule runs.

Every stage command receives its typed section of params.yaml as JSON (the rule's `params:`, so a
changed value reruns the job), explicit input/output paths, and runs inside one MLflow run.
Settings that must not trigger reruns (MLflow experiment, device) come from the environment the
Snakefile sets: `ROBUSTIFY_EXPERIMENT`, `ROBUSTIFY_DEVICE`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("robustify")


# ------------------------------------------------------------------ shared helpers
def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected JSON ({e})") from e


def _wildcards(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--wildcard expects key=value, got {item!r}")
        out[key] = value
    return out


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device 'cuda' was requested (params.yaml: device) but no CUDA device is visible")
    return name


def _setup_torch(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (the rule's `threads`)")
    p.add_argument("--wildcard", action="append", default=[], metavar="KEY=VALUE", help="tagged on the MLflow run")
    p.add_argument("--experiment", default=os.environ.get("ROBUSTIFY_EXPERIMENT", "robustify"))
    p.add_argument("--device", default=os.environ.get("ROBUSTIFY_DEVICE", "auto"), choices=["auto", "cpu", "cuda"])


# ------------------------------------------------------------------ stages

def _train_split(dataset: Any, name: str, domain: str | None, clip: Any, threads: int | None) -> Any:
    """A training/validation split as the loop's data source at the CLIP's input size and normalisation:
    in memory when it fits, else streamed from the files (`methods.train_data.make_train_data`)."""
    import open_clip

    from robustify.methods.train_data import make_train_data

    frame = dataset.select(name, domain)  # raises naming the manifest when empty
    pp = open_clip.get_model_preprocess_cfg(clip)
    if pp.get("resize_mode", "shortest") != "shortest":
        raise SystemExit(f"resize_mode '{pp['resize_mode']}' of the model's preprocessing is not supported for "
                         "training data (only 'shortest': resize the shortest side, centre-crop)")
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][-1]
    workers = max(0, min(8, (threads or 1) - 1))  # decode processes beside the job's main one
    return make_train_data(frame["path"].tolist(), frame["label"].to_numpy(dtype="int64"), size, pp["mean"],
                           pp["std"], workers=workers, interpolation=pp.get("interpolation", "bicubic"))


def _result_context(info: dict[str, Any], run_id: str | None) -> dict[str, Any]:
    """The results-schema columns a classifier directory's classifier.json determines."""
    return {"model_id": info["model_id"], "model_family": info["family"], "arch": info["arch"],
            "method": info["method"], "method_params": info.get("method_params", {}), "seed": info.get("seed"),
            "train_dataset": info.get("train_dataset"), "run_id": run_id}


def _alpha_name(alpha: float) -> str:
    """`a0.25`: the path segment and model-id suffix of a WiSE-FT α (the rules format it the same way)."""
    return f"a{alpha:g}"

def cmd_prepare(a: argparse.Namespace) -> None:
    from robustify.data.prepare import prepare
    from robustify.tracking import job_run

    params = {"type": a.type, "source": a.source, "options": a.options, "holdout": a.holdout}
    with job_run("prepare", params, a.experiment, _wildcards(a.wildcard)) as run:
        t0 = time.perf_counter()
        manifest = prepare(a.type, a.source, a.out, a.options, workers=max(1, a.threads or 1) * 4,
                           holdout=a.holdout)
        rejects = Path(a.out) / "rejects.parquet"
        import pandas as pd

        n_rejected = len(pd.read_parquet(rejects))
        log.info("%s: %d images, %d rejected (see %s)", a.type, len(manifest), n_rejected, rejects)
        run.log_metrics({"images": len(manifest), "rejected": n_rejected, "seconds": time.perf_counter() - t0})
        run.log_artifact(Path(a.out) / "dataset.json")
        if n_rejected:
            run.log_artifact(rejects)


def _corrupt_spec(a: argparse.Namespace) -> Any:
    from robustify.corruptions.build import spec_from_params

    return spec_from_params(a.params, f"corrupt.{a.name}", a.seed)


def cmd_corrupt(a: argparse.Namespace) -> None:
    from robustify.corruptions.build import build_shard
    from robustify.data.registry import get_dataset
    from robustify.tracking import job_run

    spec = _corrupt_spec(a)
    dataset = get_dataset(a.source_type, a.source_root, a.source_options)
    params = {"corrupt": a.params, "source_type": a.source_type, "corruption": a.corruption,
              "severity": a.severity, "shard": a.shard, "seed": a.seed}
    with job_run("corrupt", params, a.experiment, _wildcards(a.wildcard)) as run:
        t0 = time.perf_counter()
        rows = build_shard(dataset, spec, a.corruption, a.severity, a.shard, a.out, sources=a.sources)
        rejected = int(rows["reject_reason"].notna().sum())
        seconds = time.perf_counter() - t0
        log.info("%s/%s shard %d: %d images, %d rejected, %.1f s", a.corruption, a.severity, a.shard,
                 len(rows) - rejected, rejected, seconds)
        run.log_metrics({"images": len(rows) - rejected, "rejected": rejected, "seconds": seconds,
                         "images_per_second": (len(rows) - rejected) / max(seconds, 1e-9)})


def cmd_corrupt_sources(a: argparse.Namespace) -> None:
    from robustify.corruptions.build import build_sources, sources_paths
    from robustify.data.registry import get_dataset
    from robustify.tracking import job_run

    spec = _corrupt_spec(a)
    dataset = get_dataset(a.source_type, a.source_root, a.source_options)
    params = {"corrupt": a.params, "source_type": a.source_type, "shard": a.shard, "seed": a.seed}
    with job_run("corrupt_sources", params, a.experiment, _wildcards(a.wildcard)) as run:
        t0 = time.perf_counter()
        index = build_sources(dataset, spec, a.shard, a.out)
        rejected = int(index["reject_reason"].notna().sum())
        seconds = time.perf_counter() - t0
        npy = sources_paths(a.out, a.shard)[0]
        log.info("shard %d: %d sources decoded, %d rejected, %.1f s → %s (%.0f MB)", a.shard, len(index) - rejected,
                 rejected, seconds, npy, npy.stat().st_size / 1e6)
        run.log_metrics({"images": len(index) - rejected, "rejected": rejected, "seconds": seconds,
                         "megabytes": npy.stat().st_size / 1e6})


def cmd_corrupt_merge(a: argparse.Namespace) -> None:
    from robustify.corruptions.build import merge
    from robustify.tracking import job_run

    spec = _corrupt_spec(a)
    with job_run("corrupt_merge", {"corrupt": a.params, "seed": a.seed}, a.experiment, _wildcards(a.wildcard)) as run:
        manifest, rejects = merge(a.out, spec, a.source_root, a.shards)
        log.info("%s: %d images, %d rejected sources (see %s)", a.out, len(manifest), len(rejects),
                 Path(a.out) / "rejects.parquet")
        run.log_metrics({"images": len(manifest), "rejected_sources": len(rejects)})
        run.log_artifact(Path(a.out) / "dataset.json")
        if len(rejects):
            run.log_artifact(Path(a.out) / "rejects.parquet")


def cmd_perturb(a: argparse.Namespace) -> None:
    from robustify.corruptions.sequence_build import build_sequence_shard, sequence_spec_from_params
    from robustify.data.registry import get_dataset
    from robustify.tracking import job_run

    spec = sequence_spec_from_params(a.params, f"perturb.{a.name}", a.seed)
    dataset = get_dataset(a.source_type, a.source_root, a.source_options)
    params = {"perturb": a.params, "source_type": a.source_type, "perturbation": a.perturbation, "shard": a.shard,
              "seed": a.seed}
    with job_run("perturb", params, a.experiment, _wildcards(a.wildcard)) as run:
        t0 = time.perf_counter()
        rows = build_sequence_shard(dataset, spec, a.perturbation, a.shard, a.out)
        rejected = int(rows["reject_reason"].notna().sum())
        log.info("%s shard %d: %d sequences, %d rejected", a.perturbation, a.shard, len(rows) - rejected, rejected)
        run.log_metrics({"sequences": len(rows) - rejected, "rejected": rejected, "seconds": time.perf_counter() - t0})


def cmd_perturb_merge(a: argparse.Namespace) -> None:
    from robustify.corruptions.sequence_build import merge_sequences, sequence_spec_from_params
    from robustify.tracking import job_run

    spec = sequence_spec_from_params(a.params, f"perturb.{a.name}", a.seed)
    with job_run("perturb_merge", {"perturb": a.params, "seed": a.seed}, a.experiment, _wildcards(a.wildcard)) as run:
        manifest, rejects = merge_sequences(a.out, spec, a.source_root, a.shards)
        log.info("%s: %d sequences, %d rejected sources", a.out, len(manifest), len(rejects))
        run.log_metrics({"sequences": len(manifest), "rejected_sources": len(rejects)})


def cmd_miniworld(a: argparse.Namespace) -> None:
    from robustify.config import MiniWorldConfig, section
    from robustify.data.miniworld import generate
    from robustify.tracking import job_run

    cfg = section(MiniWorldConfig, a.params, "miniworld")
    with job_run("miniworld", {"miniworld": a.params, "seed": a.seed}, a.experiment, _wildcards(a.wildcard)) as run:
        t0 = time.perf_counter()
        manifest = generate(cfg, a.seed, a.out, progress=True)
        counts = manifest.groupby(["split", "domain"]).size()
        log.info("wrote %d images to %s\n%s", len(manifest), a.out, counts.to_string())
        run.log_metrics({"images": len(manifest), "seconds": time.perf_counter() - t0})
        run.log_artifact(Path(a.out) / "dataset.json")


def cmd_pretrain(a: argparse.Namespace) -> None:
    import open_clip

    from robustify.config import ModelSpec, PretrainConfig, section
    from robustify.data.loading import load_uint8_stack
    from robustify.data.registry import get_dataset
    from robustify.io import derive_seed, params_hash
    from robustify.methods.pretrain_clip import PairData, pretrain
    from robustify.models.clip import create_clip, save_clip, tokenizer
    from robustify.tracking import job_run

    cfg = section(PretrainConfig, a.params, "pretrain")
    spec = section(ModelSpec, a.model_spec, f"models.{cfg.model}")
    _setup_torch(a.threads)
    params = {"pretrain": a.params, "model": a.model_spec, "seed": a.seed}
    with job_run("pretrain", params, a.experiment, _wildcards(a.wildcard)) as run:
        dataset = get_dataset(cfg.dataset, a.dataset_root)
        pairs = dataset.select("pretrain")
        if pairs["caption"].isna().any():
            raise SystemExit(f"{dataset.manifest_path}: pretrain items without a caption")
        log.info("decoding %d pre-training images", len(pairs))
        images = load_uint8_stack(pairs["path"].tolist())
        tokens = tokenizer(spec.arch)(pairs["caption"].tolist())
        model = create_clip(spec, init_seed=derive_seed(a.seed, "pretrain", "init", cfg.model))
        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp["size"] if isinstance(pp["size"], int) else pp["size"][-1]
        if images.shape[-1] != size:
            raise SystemExit(f"{dataset.manifest_path}: images are {images.shape[-1]} px but {spec.arch} expects {pp['size']}")
        out = Path(a.out)
        summary = pretrain(
            model, PairData(images, tokens), cfg, a.seed, tuple(pp["mean"]), tuple(pp["std"]),
            resume_path=out / "resume.pt", log_metrics=run.log_metrics, device=resolve_device(a.device),
            fingerprint=params_hash(params),
        )
        log.info("pre-training done: %s", summary)
        save_clip(model.cpu(), spec, out, extra={"pretrain": a.params, "seed": a.seed, "pairs": len(pairs)})
        run.log_metrics(summary)
        run.log_artifact(out / "config.json")


def cmd_zeroshot(a: argparse.Namespace) -> None:
    import torch

    from robustify.config import ModelSpec, ZeroShotConfig, section
    from robustify.data.registry import Dataset
    from robustify.models.clip import create_clip, tokenizer
    from robustify.models.zeroshot import build_zeroshot_head, resolve_templates, save_zeroshot_classifier
    from robustify.tracking import job_run

    cfg = section(ZeroShotConfig, a.params, "zeroshot")
    spec = section(ModelSpec, a.model_spec, f"models.{a.model_name}")
    if spec.checkpoint is None:
        raise SystemExit(f"models.{a.model_name}: a zero-shot classifier needs a checkpoint (got null)")
    _setup_torch(a.threads)
    params = {"zeroshot": a.params, "model": a.model_spec, "seed": a.seed}
    with job_run("zeroshot", params, a.experiment, _wildcards(a.wildcard)) as run:
        classnames = Dataset(a.dataset_root).classnames  # dataset.json, whatever the dataset's class
        templates = resolve_templates(cfg.templates)
        clip = create_clip(spec).to(resolve_device(a.device))
        with torch.no_grad():
            head = build_zeroshot_head(clip, tokenizer(spec.arch), classnames, templates)
        info = {
            "model_id": f"zeroshot/{a.model_name}", "method": "zeroshot", "seed": a.seed,
            "method_params": {"templates": cfg.templates if isinstance(cfg.templates, str) else templates},
            "train_dataset": a.train_dataset,
            "label_dataset": cfg.dataset, "classnames": classnames,
        }
        save_zeroshot_classifier(a.out, head, spec, str(spec.checkpoint), info)
        run.log_metrics({"classes": len(classnames), "templates": len(templates), "logit_scale": head.scale.item()})
        run.log_artifact(Path(a.out) / "classifier.json")


def cmd_finetune(a: argparse.Namespace) -> None:
    import statistics

    from robustify.config import CLIP_START_METHODS
    from robustify.data.registry import get_dataset
    from robustify.io import params_hash, sha256_file, write_json
    from robustify.methods.finetune import (
        config_from,
        finetune,
        make_method,
        method_accepts,
        tuned_and_reference,
        tuned_and_reference_timm,
    )
    from robustify.models.clip import tokenizer
    from robustify.models.zeroshot import load_classifier
    from robustify.tracking import job_run

    cfg = config_from(a.params, "finetune.recipe")
    method_params = dict(a.method_params)
    if a.teacher and method_accepts(a.method, "teacher"):  # the distillation family's robust teacher
        method_params.update(teacher=str(a.teacher), teacher_name=a.teacher_name or Path(a.teacher).name)
    method = make_method(a.method, method_params)
    _setup_torch(a.threads)
    params = {"recipe": a.params, "method": a.method, "method_params": method.params, "seed": a.seed,
              "teacher": sha256_file(Path(a.teacher) / "classifier.json") if a.teacher else None,
              "data": {"root": str(a.dataset_root), "domain": a.domain, "train": a.train_split, "val": a.val_split},
              # the start point's identity: a resume state left by a run from another start model is not continued
              "zeroshot": _start_fingerprint(a.zeroshot)}
    with job_run("finetune", params, a.experiment, _wildcards(a.wildcard)) as run:
        zs, base, clip = load_classifier(a.zeroshot, with_clip=True)
        dataset = get_dataset(a.dataset_type, a.dataset_root, a.dataset_options)

        def split(name: str) -> Any:
            return _train_split(dataset, name, a.domain, clip if clip is not None else zs.encoder, a.threads)

        train, val = split(a.train_split), split(a.val_split)
        if clip is None:  # a timm classifier (unimodal student, paper Table 3): no text tower
            if a.corpus_split or method.params.get("setup") == "zeroshot" or a.method in CLIP_START_METHODS:
                raise SystemExit(f"method '{a.method}' (params {method.params}) needs a CLIP start point (text tower or "
                                 f"zero-shot head), but {a.zeroshot} is a timm classifier ({base.get('arch')})")
            model, reference, text = tuned_and_reference_timm(zs)
        else:
            model, reference, text = tuned_and_reference(clip, zs.head)
            text.tokenize = tokenizer(base["arch"])
        if a.corpus_split:
            text.corpus = dataset.select(a.corpus_split)["caption"].dropna().tolist()
        out = Path(a.out)
        result = finetune(model, reference, method, train, val, cfg, a.seed, text=text, resume_path=out / "resume.pt",
                          fingerprint=params_hash(params), log_metrics=run.log_metrics, device=resolve_device(a.device))
        run_name = a.run_name or a.method
        model_id = a.model_id or f"ft/{a.model_name}/{run_name}/s{a.seed}"
        info = {"model_id": model_id, "method": a.method, "run": run_name, "method_params": method.params, "seed": a.seed,
                "train_dataset": a.train_dataset, "zeroshot": str(a.zeroshot), "best_step": result.best_step,
                "best_val_accuracy": result.best_val_accuracy,
                "cost": _training_cost(result, cfg.batch_size, reference, train)}
        write_json(out / "history.json", {"history": result.history,
                                          "median_step_seconds": statistics.median(result.step_times or [float("nan")])})
        _save_trained(out, result.model, base, a.zeroshot, info)
        run.log_metrics({"best_val_accuracy": result.best_val_accuracy, "best_step": result.best_step,
                         "train_seconds": result.train_seconds})
        log.info("%s: best val accuracy %.4f at step %d (%.1f s)", model_id, result.best_val_accuracy,
                 result.best_step, result.train_seconds)


def _start_fingerprint(clf_dir: str | Path) -> str:
    """Hash of a start classifier's weights: a zero-shot head, or a timm classifier's whole model."""
    from robustify.io import read_json, sha256_file

    info = read_json(Path(clf_dir) / "classifier.json")
    return sha256_file(Path(clf_dir) / (info["weights"] if info.get("family") == "timm" else "head.safetensors"))


def _training_cost(result: Any, batch_size: int, initial: Any, train: Any) -> dict[str, float]:
    """Cost metrics of a finished run (`eval.cost`): trainable parameters of what was trained, median
    step time per image, and inference GFLOPs per image against the initial model's."""
    import torch

    from robustify.eval.cost import count_trainable, gflops, ms_per_image, student_predict_fn
    from robustify.eval.student import N_PASSES
    from robustify.methods.distill.method import HeadView

    size = int(train.images.shape[-1]) if hasattr(train, "images") else int(train.size)
    x = torch.zeros(1, 3, size, size)
    model = result.model.cpu().eval()
    if isinstance(model, HeadView):
        student = model.student
        trained, predict = student, (student_predict_fn(student, N_PASSES) if len(student.heads) > 1 else model)
    else:
        trained, predict = model, model
    base = gflops(initial.cpu().eval(), x)
    flops = gflops(predict, x)
    return {"trainable_params": float(count_trainable(trained)), "train_ms_per_image": ms_per_image(result.step_times, batch_size),
            "inference_gflops": flops, "inference_gflops_overhead": flops / base - 1.0}


def _save_trained(out: Path, model: Any, base: dict[str, Any], zeroshot: str | Path, info: dict[str, Any]) -> None:
    """A trained model's directory: a partial-tuning student, or a classifier (tower + head)."""
    from robustify.methods.distill.checkpoint import save_student
    from robustify.methods.distill.method import HeadView
    from robustify.models.zeroshot import save_classifier

    if isinstance(model, HeadView):
        p = info["method_params"]
        spec = {"fraction_tuned": p["fraction_tuned"], "head_fraction": p["head_fraction"], "dropout": p["dropout"],
                "heads": list(model.student.heads), "classifier_trainable": p["setup"] == "visual"}
        save_student(out, model.student, base, zeroshot, spec, info)
    elif base.get("family") == "timm":  # a timm start point's run: the whole timm model, as it loads
        from robustify.models.timm_models import save_timm_classifier

        save_timm_classifier(out, model, base["arch"], {**{k: base[k] for k in ("train_dataset", "classes") if k in base},
                                                        **info})
    else:
        save_classifier(out, model, base, info)


def _load_trained(clf_dir: str | Path) -> tuple[Any, dict[str, Any], Any]:
    """(classifier module, classifier.json, the CLIP behind it or None) of any trained directory."""
    from robustify.methods.distill.checkpoint import is_student_dir, load_student
    from robustify.models.zeroshot import load_classifier

    if is_student_dir(clf_dir):
        view, info = load_student(clf_dir)
        return view, info, None
    return load_classifier(clf_dir, with_clip=True)


def cmd_teacher(a: argparse.Namespace) -> None:
    """Robustify a small timm teacher (AugMix + JSD + DeepAugment, or PixMix) on a labelled dataset."""
    import copy

    from robustify.config import ModelSpec
    from robustify.data.registry import get_dataset
    from robustify.io import derive_seed, params_hash, write_json
    from robustify.methods.finetune import config_from, finetune, make_method
    from robustify.models.timm_models import create_timm, save_timm_classifier, timm_classifier
    from robustify.tracking import job_run

    cfg = config_from(a.params, "teachers.recipe")
    method = make_method(a.method, a.method_params)
    _setup_torch(a.threads)
    spec = a.model_spec
    for key in ("family", "arch"):
        if key not in spec:
            raise SystemExit(f"teacher model spec: missing key '{key}' (got {sorted(spec)})")
    if spec["family"] != "timm":
        raise SystemExit(f"teachers are timm models; models.{a.teacher_name}.family is '{spec['family']}'")
    dataset = get_dataset(a.dataset_type, a.dataset_root, a.dataset_options)
    classes = dataset.classnames
    params = {"recipe": a.params, "method": a.method, "method_params": method.params, "seed": a.seed, "model": spec,
              "data": {"root": str(a.dataset_root), "domain": a.domain, "train": a.train_split, "val": a.val_split}}
    with job_run("teacher", params, a.experiment, _wildcards(a.wildcard)) as run:
        checkpoint = spec.get("checkpoint")
        model = create_timm(ModelSpec("timm", spec["arch"], checkpoint), num_classes=len(classes),
                            init_seed=derive_seed(a.seed, "teacher-init", a.teacher_name) if checkpoint is None else None)
        classifier = timm_classifier(model, spec.get("image_size"))
        train = _train_split(dataset, a.train_split, a.domain, classifier.encoder, a.threads)
        val = _train_split(dataset, a.val_split, a.domain, classifier.encoder, a.threads)
        reference = copy.deepcopy(classifier).eval()
        out = Path(a.out)
        result = finetune(classifier, reference, method, train, val, cfg, a.seed, resume_path=out / "resume.pt",
                          fingerprint=params_hash(params), log_metrics=run.log_metrics, device=resolve_device(a.device))
        info = {"model_id": f"teachers/{a.teacher_name}", "method": a.method, "run": a.teacher_name,
                "method_params": method.params, "seed": a.seed, "train_dataset": a.train_dataset, "classes": list(classes),
                "best_step": result.best_step, "best_val_accuracy": result.best_val_accuracy,
                "cost": _training_cost(result, cfg.batch_size, reference, train)}
        write_json(out / "history.json", {"history": result.history})
        save_timm_classifier(out, result.model, spec["arch"], info)
        run.log_metrics({"best_val_accuracy": result.best_val_accuracy, "train_seconds": result.train_seconds})
        log.info("teachers/%s: best val accuracy %.4f (%.1f s)", a.teacher_name, result.best_val_accuracy,
                 result.train_seconds)


def cmd_import_timm(a: argparse.Namespace) -> None:
    """A pre-trained timm classifier (its own head, e.g. ImageNet-1k) as a classifier directory: the start
    point of a unimodal student (paper Table 3) and its "Standard training" row."""
    from robustify.config import ModelSpec
    from robustify.data.registry import get_dataset
    from robustify.models.timm_models import create_timm, save_timm_classifier, timm_classifier
    from robustify.tracking import job_run

    spec = a.model_spec
    where = f"models.{a.model_name}"
    for key in ("family", "arch", "checkpoint"):
        if key not in spec:
            raise SystemExit(f"{where}: missing key '{key}' (got {sorted(spec)})")
    if spec["family"] != "timm":
        raise SystemExit(f"{where}.family is '{spec['family']}'; a pre-trained start point here is a timm model "
                         "(CLIP models start from their zero-shot classifier)")
    if spec["checkpoint"] is None:
        raise SystemExit(f"{where}.checkpoint is null; a pre-trained start point needs its weights (a local path)")
    classes = get_dataset(a.dataset_type, a.dataset_root, a.dataset_options).classnames
    params = {"model": spec, "dataset": a.train_dataset}
    with job_run("import-timm", params, a.experiment, _wildcards(a.wildcard)):
        model = create_timm(ModelSpec("timm", spec["arch"], spec["checkpoint"]))  # the head from the checkpoint
        if model.num_classes != len(classes):
            raise SystemExit(f"{where}: the checkpoint {spec['checkpoint']} has a {model.num_classes}-class head, "
                             f"but dataset '{a.train_dataset}' has {len(classes)} classes")
        info = {"model_id": f"timm/{a.model_name}", "method": "pretrained", "run": a.model_name, "seed": 0,
                "train_dataset": a.train_dataset, "classes": list(classes), "checkpoint": str(spec["checkpoint"])}
        save_timm_classifier(a.out, timm_classifier(model, spec.get("image_size")), spec["arch"], info)
        log.info("timm/%s: %s from %s", a.model_name, spec["arch"], spec["checkpoint"])


def cmd_evaluate(a: argparse.Namespace) -> None:
    from robustify.config import EvalSetSpec, EvaluateConfig, section
    from robustify.data.registry import get_dataset
    from robustify.eval.evaluate import evaluate
    from robustify.io import write_parquet
    from robustify.models.zeroshot import load_classifier
    from robustify.tracking import job_run

    cfg = section(EvaluateConfig, a.params, "evaluate")
    spec = section(EvalSetSpec, a.eval_set, f"eval_sets.{a.eval_name}")
    _setup_torch(a.threads)
    params = {"evaluate": a.params, "eval_set": {a.eval_name: a.eval_set}, "classifier": str(a.classifier)}
    with job_run("evaluate", params, a.experiment, _wildcards(a.wildcard)) as run:
        classifier, info = load_classifier(a.classifier)
        dataset = get_dataset(a.dataset_type, a.dataset_root, a.dataset_options)
        rows = evaluate(classifier, dataset, a.eval_name, spec, cfg, _result_context(info, run.run_id),
                        resolve_device(a.device))
        write_parquet(a.out, rows)
        metrics = dict(zip(rows["metric"], rows["value"]))
        log.info("%s on %s: %s", info["model_id"], a.eval_name, metrics)
        run.log_metrics(metrics)
        run.set_tags({"model_id": info["model_id"], "eval_dataset": a.eval_name})


def cmd_evaluate_tuned(a: argparse.Namespace) -> None:
    """A trained classifier (and its WiSE-FT α sweep) on every eval set, one pass over each set."""
    from robustify.config import EvalSetSpec, EvaluateConfig, section
    from robustify.data.registry import get_dataset
    from robustify.eval.energy import random_text_embeddings, text_moment
    from robustify.eval.evaluate import EnergyGap, Entry, evaluate_models
    from robustify.io import write_parquet
    from robustify.eval.schema import make_rows
    from robustify.eval.student import evaluate_student
    from robustify.methods.posthoc.apply import wise_classifier
    from robustify.models.clip import tokenizer
    from robustify.models.zeroshot import load_classifier
    from robustify.tracking import job_run

    cfg = section(EvaluateConfig, a.params, "evaluate")
    sets = {name: section(EvalSetSpec, s["eval_set"], f"eval_sets.{name}") for name, s in a.sets.items()}
    alphas = [float(x) for x in a.wise_alphas]
    if alphas and not (a.zeroshot and a.wise_out_dir):
        raise SystemExit("--wise-alphas needs --zeroshot (the α=0 end of the interpolation) and --wise-out-dir")
    _setup_torch(a.threads)
    device = resolve_device(a.device)
    params = {"evaluate": a.params, "sets": a.sets, "classifier": str(a.classifier), "energy_gap": a.energy_gap,
              "wise_alphas": alphas}
    with job_run("evaluate", params, a.experiment, _wildcards(a.wildcard)) as run:
        classifier, info, clip = _load_trained(a.classifier)
        if a.energy_gap and clip is None:
            raise SystemExit(f"{a.classifier}: the energy gap needs a CLIP classifier (this one has no text tower)")
        student = getattr(classifier, "student", None)
        selects = student is not None and len(student.heads) > 1  # three heads: MC head selection (SPEC §3)
        if selects and alphas:
            raise SystemExit(f"{a.classifier}: a three-head student has no WiSE-FT sweep (drop --wise-alphas)")
        entries = [Entry(classifier, _result_context(info, run.run_id))]
        outputs = [Path(a.out_dir)]
        if alphas:
            zeroshot, _ = load_classifier(a.zeroshot)
            for alpha in alphas:
                module = zeroshot if alpha == 0 else classifier if alpha == 1 else wise_classifier(zeroshot, classifier, alpha)
                ctx = {**_result_context(info, run.run_id), "model_id": f"wise/{info['model_id'].split('/', 1)[1]}/{_alpha_name(alpha)}",
                       "method": "wise", "method_params": {"base": info.get("run", info["method"]), "alpha": alpha}}
                entries.append(Entry(module, ctx))
                outputs.append(Path(a.wise_out_dir) / _alpha_name(alpha))
        gap = None
        if a.energy_gap:
            g = a.energy_gap
            corpus = None
            if g["vocab"] == "seen":
                if not a.corpus_root or not a.corpus_split:
                    raise SystemExit("energy gap with vocab 'seen' needs --corpus-root and --corpus-split (captions)")
                corpus = get_dataset(a.corpus_type, a.corpus_root, {}).select(a.corpus_split)["caption"].dropna().tolist()
            texts = random_text_embeddings(clip.to(device), tokenizer(info["arch"]), g["texts"], g["length"], g["vocab"],
                                           corpus, g["seed"])
            theta0 = zeroshot.encoder if alphas else clip.visual  # the same weights; shared, θ0 runs once
            gap = EnergyGap(theta0, float(clip.logit_scale.detach().exp()), text_moment(texts))
        for name, spec in sets.items():
            s = a.sets[name]
            dataset = get_dataset(s["type"], s["root"], s.get("options", {}))
            if selects:
                rows = evaluate_student(student, classifier.tower, dataset, name, spec, cfg, entries[0].context, device,
                                        seed=int(info.get("seed") or 0))
            else:
                rows = evaluate_models(entries, dataset, name, spec, cfg, device, gap)
            for entry, out in zip(entries, outputs, strict=True):
                part = rows[rows["model_id"] == entry.context["model_id"]]
                write_parquet(out / f"{name}.parquet", part.reset_index(drop=True))
            mine = rows[(rows["model_id"] == info["model_id"]) & rows["corruption"].isna()]
            metrics = dict(zip(mine["metric"], mine["value"]))
            log.info("%s on %s: %s", info["model_id"], name, metrics)
            run.log_metrics({f"{name}/{k}": v for k, v in metrics.items()})
        if a.cost_out:
            if "cost" not in info:
                raise SystemExit(f"{a.classifier}/classifier.json has no 'cost' (trained before cost metrics existed; rerun it)")
            ctx = {**_result_context(info, run.run_id), "eval_dataset": info.get("train_dataset"), "shift_type": "cost"}
            write_parquet(Path(a.cost_out), make_rows(ctx, info["cost"], 1))
        run.set_tags({"model_id": info["model_id"]})


def _posthoc_inputs(a: argparse.Namespace, clf_dir: str) -> tuple[Any, dict[str, Any], Any, Any]:
    """(classifier, its classifier.json, its CLIP, validation split) of a post-hoc job's input."""
    from robustify.data.registry import get_dataset
    from robustify.models.zeroshot import load_classifier

    clf, info, clip = load_classifier(clf_dir, with_clip=True)
    dataset = get_dataset(a.dataset_type, a.dataset_root, a.dataset_options)
    return clf, info, clip, _train_split(dataset, a.val_split, a.domain, clip, a.threads)


def cmd_posthoc(a: argparse.Namespace) -> None:
    """TPGM / TPGM-C: the projection radii of one fine-tuned run learned on the validation split."""
    from robustify.io import write_json
    from robustify.methods.posthoc.apply import tpgm_classifier
    from robustify.models.zeroshot import load_classifier, save_classifier
    from robustify.tracking import job_run

    allowed = {"norm", "reg", "steps", "lr", "batch_size"}
    unknown = sorted(set(a.params) - allowed)
    if unknown:
        raise SystemExit(f"posthoc.{a.kind}.params: unknown key(s) {unknown} (allowed: {sorted(allowed)})")
    if a.kind == "tpgm-c" and not a.params.get("reg", 0) > 0:
        raise SystemExit("posthoc.tpgm-c.params.reg must be > 0 (reg 0 is plain TPGM)")
    if a.kind == "tpgm" and a.params.get("reg", 0) != 0:
        raise SystemExit("posthoc.tpgm.params.reg must be 0 (use tpgm-c for the regularised variant)")
    _setup_torch(a.threads)
    params = {"kind": a.kind, "params": a.params, "finetuned": a.finetuned, "zeroshot": a.zeroshot, "seed": a.seed,
              "val": {"root": a.dataset_root, "split": a.val_split, "domain": a.domain}}
    with job_run("posthoc", params, a.experiment, _wildcards(a.wildcard)) as run:
        finetuned, info, _clip, val = _posthoc_inputs(a, a.finetuned)
        zeroshot, _ = load_classifier(a.zeroshot)
        projected, record = tpgm_classifier(zeroshot, finetuned, val, seed=a.seed, device=resolve_device(a.device),
                                            **a.params)
        model_id = f"{a.kind}/{info['model_id'].split('/', 1)[1]}"
        out = Path(a.out)
        write_json(out / "posthoc.json", record)
        save_classifier(out, projected, info, {
            "model_id": model_id, "method": a.kind, "seed": info.get("seed"), "train_dataset": info.get("train_dataset"),
            "method_params": {"base": info.get("run", info["method"]), **a.params}, "finetuned": str(a.finetuned)})
        run.log_metrics({"mean_ratio": record["mean_ratio"], "final_val_loss": record["final_loss"],
                         "val_accuracy_projected": record["val_accuracy"]["projected"]})
        log.info("%s: mean ratio %.3f, val accuracy %.4f -> %.4f", model_id, record["mean_ratio"],
                 record["val_accuracy"]["finetuned"], record["val_accuracy"]["projected"])


def cmd_soups(a: argparse.Namespace) -> None:
    """Uniform soup, greedy soup and greedy ensemble of one recipe's runs (chosen on the validation split)."""
    from robustify.io import write_json
    from robustify.methods.posthoc.apply import soups
    from robustify.models.zeroshot import load_classifier, save_classifier, save_ensemble
    from robustify.tracking import job_run

    if len(a.members) < 2:
        raise SystemExit(f"a soup needs at least 2 fine-tuned runs, got {len(a.members)}: {a.members}")
    _setup_torch(a.threads)
    params = {"kinds": sorted(a.out_dirs), "members": a.members, "val": {"root": a.dataset_root, "split": a.val_split,
                                                                          "domain": a.domain}}
    with job_run("posthoc", params, a.experiment, _wildcards(a.wildcard)) as run:
        first, base, _clip, val = _posthoc_inputs(a, a.members[0])
        members, ids = [first], [base["model_id"]]
        for d in a.members[1:]:
            clf, info = load_classifier(d)
            members.append(clf)
            ids.append(info["model_id"])
        made = soups(members, val, list(a.out_dirs), device=resolve_device(a.device))
        backbone_run = "/".join(base["model_id"].split("/")[1:3])  # <model>/<run>
        for kind, (model, record) in made.items():
            out = Path(a.out_dirs[kind])
            chosen = [ids[i] for i in record["members"]]
            info = {"model_id": f"{kind}/{backbone_run}", "method": kind, "seed": None,
                    "train_dataset": base.get("train_dataset"),
                    "method_params": {"base": base.get("run", base["method"]), "members": chosen}}
            write_json(out / "posthoc.json", {**record, "member_ids": ids})
            if kind == "greedy-ensemble":
                save_ensemble(out, [a.members[i] for i in record["members"]], info)
            else:
                save_classifier(out, model, base, info)
            log.info("%s: %d of %d runs (%s)", info["model_id"], len(chosen), len(ids), ", ".join(chosen))
        run.log_metrics({f"{k}_members": len(r["members"]) for k, (_, r) in made.items()})


def cmd_report(a: argparse.Namespace) -> None:
    import pandas as pd

    from robustify.io import write_json, write_parquet, write_text
    from robustify.report.aggregate import aggregate, summary
    from robustify.report.derived import corruption_rows, effective_robustness_table_rows, flip_rate_rows
    from robustify.report.tables import robustness_markdown, zeroshot_markdown
    from robustify.tracking import job_run

    out = Path(a.out_dir)
    er = a.effective_robustness or {}
    params = {"inputs": len(a.inputs), "clean_sets": a.clean_sets, "effective_robustness": er,
              "flip_rate_baseline": a.flip_rate_baseline, "finetune_report": a.finetune_report,
              "distill_report": a.distill_report,
              "wise_alpha": a.wise_alpha, "claim_tolerance": a.claim_tolerance}
    with job_run("report", params, a.experiment, _wildcards(a.wildcard)) as run:
        df = aggregate(a.inputs)
        derived = [corruption_rows(df, a.clean_sets), flip_rate_rows(df, a.flip_rate_baseline)]
        if er.get("reference") and er.get("baselines"):
            derived.append(effective_robustness_table_rows(df, er["reference"], er["baselines"]))
        df = pd.concat([df, *derived], ignore_index=True)
        write_parquet(out / "all_metrics.parquet", df)
        write_text(out / "tables" / "zeroshot.md", zeroshot_markdown(df))
        write_text(out / "tables" / "robustness.md", robustness_markdown(df))
        write_json(out / "summary.json", summary(df))
        written = [out / name for name in ("tables/zeroshot.md", "tables/robustness.md", "summary.json")]
        if a.finetune_report:
            from robustify.report.finetune import write_finetune_report

            written += write_finetune_report(df, out, a.wise_alpha, tolerance=a.claim_tolerance).values()
        if a.distill_report:
            from robustify.report.distill import write_distill_report

            written += write_distill_report(df, out, a.wise_alpha).values()
            if not a.finetune_report:  # claims.md is otherwise written with the fine-tuning report
                from robustify.report.claims import all_claims, claims_markdown

                write_text(out / "claims.md", claims_markdown(df, all_claims(wise_alpha=a.wise_alpha,
                                                                             tolerance=a.claim_tolerance)))
                written.append(out / "claims.md")
        for path in written:
            run.log_artifact(path, str(Path("report") / path.relative_to(out).parent))
        log.info("results tables: %s, %s", out / "tables" / "zeroshot.md", out / "tables" / "robustness.md")


def cmd_validate(a: argparse.Namespace) -> None:
    from robustify.config import load_params

    load_params(*a.files, schema_path=a.schema)
    print(f"{' + '.join(a.files)}: valid")


def cmd_tracking(a: argparse.Namespace) -> None:
    from robustify import tracking

    if a.action == "init":
        print(tracking.init_store(a.experiment))
    elif a.action == "sync":
        n = tracking.sync_spool(finalize=a.finalize, root=a.spool)
        print(f"{n} spooled run(s) loaded into {tracking.tracking_uri()}")
    else:
        if not a.run_id:
            raise SystemExit("robustify tracking finish: --run-id (the pipeline's parent run) is required")
        tracking.finish_pipeline(a.run_id, a.status)


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robustify", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="a dataset's official layout → manifest.parquet (+ rejects)")
    p.add_argument("--type", required=True, help="registered dataset class, e.g. imagenet, objectnet")
    p.add_argument("--source", required=True, help="the dataset's folder in its official layout")
    p.add_argument("--options", type=_json_arg, default={}, help="datasets.<key>.options as JSON")
    p.add_argument("--holdout", type=_json_arg, default=None,
                   help='datasets.<key>.holdout as JSON: {"split_from", "split_to", "fraction", "seed"} (null: none)')
    p.add_argument("--out", required=True, help="prepared folder: manifest.parquet, dataset.json, rejects.parquet")
    _stage_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("miniworld", help="generate the embedded mini-world dataset")
    p.add_argument("--params", type=_json_arg, required=True, help="the `miniworld` section as JSON")
    p.add_argument("--out", required=True, help="dataset root (manifest.parquet, dataset.json, images/)")
    _stage_args(p)
    p.set_defaults(func=cmd_miniworld)

    p = sub.add_parser("pretrain", help="contrastive pre-training of a small open_clip model")
    p.add_argument("--params", type=_json_arg, required=True, help="the `pretrain` section as JSON")
    p.add_argument("--model-spec", type=_json_arg, required=True, help="models.<name> as JSON")
    p.add_argument("--dataset-root", required=True)
    p.add_argument("--out", required=True, help="model directory (model.safetensors + config.json)")
    _stage_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("zeroshot", help="build a zero-shot classifier from a CLIP checkpoint")
    p.add_argument("--params", type=_json_arg, required=True, help="the `zeroshot` section as JSON")
    p.add_argument("--model-name", required=True)
    p.add_argument("--model-spec", type=_json_arg, required=True, help="models.<name> as JSON, checkpoint resolved")
    p.add_argument("--train-dataset", default=None, help="what the model was pre-trained on (results column)")
    p.add_argument("--dataset-root", required=True, help="root of the dataset whose class names label the head")
    p.add_argument("--out", required=True, help="classifier directory")
    _stage_args(p)
    p.set_defaults(func=cmd_zeroshot)

    for section, what, cell, shard_fn, merge_fn, sources_fn in (
        ("corrupt", "corrupted set", "corruption x severity x shard", cmd_corrupt, cmd_corrupt_merge,
         cmd_corrupt_sources),
        ("perturb", "ImageNet-P-style sequence set", "perturbation x shard", cmd_perturb, cmd_perturb_merge, None),
    ):
        shard = sub.add_parser(section, help=f"one shard of a {what}: {cell}")
        sources = sub.add_parser(f"{section}-sources", help=f"decode one shard's sources of a {what} once for "
                                 "all its cells: sources/<shard>.npy + .parquet") if sources_fn else None
        merged = sub.add_parser(f"{section}-merge", help=f"join a {what}'s shards into its manifest")
        readers = [p for p in (shard, sources) if p is not None]  # the commands that read the sources
        for p in (*readers, merged):
            p.add_argument("--name", required=True, help=f"the set's key under `{section}:`")
            p.add_argument("--params", type=_json_arg, required=True, help=f"{section}.<name> as JSON")
            p.add_argument("--source-root", required=True, help="the prepared source dataset's folder")
            p.add_argument("--out", required=True, help="the built set's folder")
            _stage_args(p)
        for p in readers:
            p.add_argument("--source-type", required=True)
            p.add_argument("--source-options", type=_json_arg, default={})
            p.add_argument("--shard", type=int, required=True)
        if section == "corrupt":
            shard.add_argument("--corruption", required=True)
            shard.add_argument("--severity", type=int, required=True)
            shard.add_argument("--sources", default=None,
                               help="the shard's decoded-source cache (corrupt-sources' .npy) instead of decoding")
        else:
            shard.add_argument("--perturbation", required=True)
        merged.add_argument("--shards", nargs="+", required=True, help="every shard manifest of the set")
        shard.set_defaults(func=shard_fn)
        merged.set_defaults(func=merge_fn)
        if sources is not None:
            sources.set_defaults(func=sources_fn)

    p = sub.add_parser("finetune", help="fine-tune a zero-shot CLIP classifier with one registered method")
    p.add_argument("--params", type=_json_arg, required=True, help="the fine-tuning recipe (finetune.recipe) as JSON")
    p.add_argument("--method", required=True, help="registered method: ft, lp, lp-ft, ema, l2sp, kd, car-ft, ...")
    p.add_argument("--method-params", type=_json_arg, default={}, help="the method's parameters as JSON")
    p.add_argument("--model-name", required=True, help="the `models:` key (part of the model id)")
    p.add_argument("--run-name", default=None, help="the finetune.runs key (model id ft/<model>/<run>/s<seed>); "
                   "default: the method")
    p.add_argument("--zeroshot", required=True, help="the zero-shot classifier directory to start from")
    p.add_argument("--dataset-root", required=True)
    p.add_argument("--dataset-type", required=True)
    p.add_argument("--dataset-options", type=_json_arg, default={})
    p.add_argument("--domain", default=None)
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val", help="the reference validation split (best checkpoint)")
    p.add_argument("--corpus-split", default=None, help="split whose captions form Lipsum's `seen` token pool")
    p.add_argument("--train-dataset", default=None, help="results column: what the model is fine-tuned on")
    p.add_argument("--out", required=True, help="classifier directory (encoder + head + classifier.json)")
    _stage_args(p)

    p.add_argument("--model-id", default=None, help="the results' model id (default ft/<model>/<run>/s<seed>)")
    p.add_argument("--teacher", default=None, help="robust teacher directory (models/teachers/<name>), handed to "
                   "methods that take one")
    p.add_argument("--teacher-name", default=None, help="the teacher's name in the results (default: its folder)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("teacher", help="robustify a small timm teacher (AugMix + JSD + DeepAugment, PixMix)")
    p.add_argument("--params", type=_json_arg, required=True, help="the teacher's training recipe as JSON")
    p.add_argument("--method", default="augmix-jsd", help="registered method (augmix-jsd)")
    p.add_argument("--method-params", type=_json_arg, default={}, help="the method's parameters (augment, jsd_weight)")
    p.add_argument("--teacher-name", required=True, help="the teachers: key (model id teachers/<name>)")
    p.add_argument("--model-spec", type=_json_arg, required=True, help="models.<name> as JSON (family timm)")
    p.add_argument("--dataset-root", required=True)
    p.add_argument("--dataset-type", required=True)
    p.add_argument("--dataset-options", type=_json_arg, default={})
    p.add_argument("--domain", default=None)
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--train-dataset", default=None)
    p.add_argument("--out", required=True, help="teacher classifier directory (model.safetensors + classifier.json)")
    _stage_args(p)
    p.set_defaults(func=cmd_teacher)

    p = sub.add_parser("import-timm", help="a pre-trained timm classifier as a classifier directory (unimodal start)")
    p.add_argument("--model-name", required=True, help="the models: key (model id timm/<name>)")
    p.add_argument("--model-spec", type=_json_arg, required=True, help="models.<name> as JSON (family timm, checkpoint)")
    p.add_argument("--dataset-root", required=True, help="the dataset whose label space the head must have")
    p.add_argument("--dataset-type", required=True)
    p.add_argument("--dataset-options", type=_json_arg, default={})
    p.add_argument("--train-dataset", default=None)
    p.add_argument("--out", required=True, help="classifier directory (model.safetensors + classifier.json)")
    _stage_args(p)
    p.set_defaults(func=cmd_import_timm)

    p = sub.add_parser("evaluate", help="evaluate a classifier on one eval set → metrics parquet")
    p.add_argument("--params", type=_json_arg, required=True, help="the `evaluate` section as JSON")
    p.add_argument("--classifier", required=True, help="classifier directory (classifier.json)")
    p.add_argument("--eval-name", required=True)
    p.add_argument("--eval-set", type=_json_arg, required=True, help="eval_sets.<name> as JSON")
    p.add_argument("--dataset-root", required=True, help="prepared dataset folder (manifest.parquet)")
    p.add_argument("--dataset-type", required=True, help="registered dataset class (its eval protocol)")
    p.add_argument("--dataset-options", type=_json_arg, default={}, help="datasets.<key>.options as JSON")
    p.add_argument("--out", required=True, help="metrics parquet (DESIGN §5 schema)")
    _stage_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("evaluate-tuned", help="a trained classifier (+ its WiSE-FT α sweep and energy gaps) on "
                       "every eval set → one metrics parquet per model and set")
    p.add_argument("--params", type=_json_arg, required=True, help="the `evaluate` section as JSON")
    p.add_argument("--classifier", required=True, help="classifier directory (classifier.json)")
    p.add_argument("--sets", type=_json_arg, required=True,
                   help='JSON {eval set: {"eval_set": eval_sets.<name>, "root": dir, "type": class, "options": {}}}')
    p.add_argument("--out-dir", required=True, help="<out-dir>/<eval set>.parquet for the classifier")
    p.add_argument("--energy-gap", type=_json_arg, default=None, help="finetune.energy_gap as JSON (null: none)")
    p.add_argument("--corpus-root", default=None, help="dataset whose captions form the `seen` token pool")
    p.add_argument("--corpus-type", default="miniworld")
    p.add_argument("--corpus-split", default=None)
    p.add_argument("--zeroshot", default=None, help="the zero-shot classifier directory (WiSE-FT's α=0 end)")
    p.add_argument("--wise-alphas", type=_json_arg, default=[], help="JSON list of WiSE-FT α to evaluate")
    p.add_argument("--wise-out-dir", default=None, help="<wise-out-dir>/a<α>/<eval set>.parquet")
    p.add_argument("--cost-out", default=None, help="parquet of the model's training cost rows (classifier.json 'cost')")
    _stage_args(p)
    p.set_defaults(func=cmd_evaluate_tuned)

    for name, func, what in (("posthoc", cmd_posthoc, "TPGM / TPGM-C of one fine-tuned run"),
                             ("soups", cmd_soups, "uniform soup, greedy soup, greedy ensemble of runs")):
        p = sub.add_parser(name, help=f"{what} (fitted on the validation split)")
        p.add_argument("--dataset-root", required=True)
        p.add_argument("--dataset-type", required=True)
        p.add_argument("--dataset-options", type=_json_arg, default={})
        p.add_argument("--domain", default=None)
        p.add_argument("--val-split", default="val", help="held-out split (never a test split)")
        _stage_args(p)
        p.set_defaults(func=func)
        if name == "posthoc":
            p.add_argument("--kind", required=True, choices=["tpgm", "tpgm-c"])
            p.add_argument("--params", type=_json_arg, default={}, help="posthoc.<kind>.params as JSON")
            p.add_argument("--finetuned", required=True, help="the fine-tuned classifier directory")
            p.add_argument("--zeroshot", required=True, help="its zero-shot start (θ0)")
            p.add_argument("--out", required=True, help="the projected classifier's directory")
        else:
            p.add_argument("--members", nargs="+", required=True, help="fine-tuned classifier directories")
            p.add_argument("--out-dirs", type=_json_arg, required=True, help="JSON {soup kind: output directory}")

    p = sub.add_parser("report", help="aggregate metric parquets into tables and a summary")
    p.add_argument("--inputs", nargs="+", required=True)
    p.add_argument("--out-dir", default="results")
    p.add_argument("--clean-sets", type=_json_arg, default={},
                   help='JSON {corrupted eval set: its clean eval set}, for relative mCE')
    p.add_argument("--effective-robustness", type=_json_arg, default={},
                   help='JSON {"reference": eval set, "baselines": [model ids]} (the `report` section\'s entry)')
    p.add_argument("--flip-rate-baseline", default=None, help="model id whose flip probabilities normalise FR/mFR")
    p.add_argument("--finetune-report", action="store_true", help="also the fine-tuning tables, plots and claims.md")
    p.add_argument("--distill-report", action="store_true", help="also the distillation tables, Pareto plot and claims")
    p.add_argument("--wise-alpha", type=float, default=0.5, help="the WiSE-FT α shown in the fine-tuning tables")
    p.add_argument("--claim-tolerance", type=float, default=2.0, help='accuracy points of "similar reference accuracy"')
    _stage_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("validate-config", help="validate params files (later files override earlier ones)")
    p.add_argument("files", nargs="+")
    p.add_argument("--schema", default="workflow/schemas/params.schema.yaml")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("tracking", help="create the MLflow store, open or close the pipeline run, or load"
                       " the job runs the pipeline spooled (sync)")
    p.add_argument("action", choices=["init", "sync", "finish"])
    p.add_argument("--spool", default=os.environ.get("ROBUSTIFY_TRACKING_SPOOL") or ".robustify/tracking-spool",
                   help="sync: the spool directory (default: $ROBUSTIFY_TRACKING_SPOOL or the pipeline's)")
    p.add_argument("--finalize", action="store_true",
                   help="sync: also load runs that never ended, as KILLED (only when no job can be running)")
    p.add_argument("--experiment", default=os.environ.get("ROBUSTIFY_EXPERIMENT", "robustify"))
    p.add_argument("--run-id")
    p.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
    p.set_defaults(func=cmd_tracking)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # its INFO lines drown the job logs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("alembic", "mlflow", "urllib3", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    from robustify.config import ConfigError

    try:
        args.func(args)
    except ConfigError as e:
        raise SystemExit(f"robustify {args.command}: {e}") from None


if __name__ == "__main__":
    main()
