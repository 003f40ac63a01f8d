"""params.yaml validation: bad input fails before any job runs, naming the key."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from robustify.config import (
    ConfigError,
    PretrainConfig,
    load_params,
    section,
    validate_params,
)


def _validate(repo, params):
    validate_params(params, repo / "workflow/schemas/params.schema.yaml")


def test_default_params_are_valid(default_params):
    assert default_params["pretrain"]["model"] in default_params["models"]


@pytest.mark.parametrize(
    ("mutate", "named"),
    [
        (lambda p: p["pretrain"].update(stepz=10), "unknown key pretrain.stepz"),
        (lambda p: p.update(seeed=1), "unknown key seeed"),
        (lambda p: p["eval_sets"]["miniworld-photo"].update(domian="photo"), "unknown key eval_sets.miniworld-photo.domian"),
        (lambda p: p["models"]["tinyclip"].update(arch_name="x"), "unknown key models.tinyclip.arch_name"),
        (lambda p: p["resources"]["pretrain"].update(gpus=1), "unknown key resources.pretrain.gpus"),
        (lambda p: p["pretrain"].update(steps="many"), "pretrain.steps: 'many' is not of type 'integer'"),
        (lambda p: p["miniworld"].pop("train"), "miniworld: 'train' is a required property"),
        (lambda p: p["zeroshot"]["templates"].append("no placeholder"), "zeroshot.templates.6"),
        (lambda p: p["zeroshot"].update(models=["nope"]), "zeroshot.models: 'nope' is not defined under models"),
        (lambda p: p["eval_sets"]["miniworld-photo"].update(dataset="imagenett"), "eval_sets.miniworld-photo.dataset: 'imagenett' is neither miniworld nor a key of datasets"),
        (lambda p: p["miniworld"].update(reference_domain="sketch", domains=["photo"]), "miniworld.reference_domain"),
        (lambda p: p["datasets"].update(inet={"type": "imagenet", "source": "x", "extra": 1}), "unknown key datasets.inet.extra"),
        (lambda p: p["datasets"].update(inet={"type": "imagenot", "source": "x"}), "datasets.inet.type: unknown dataset type 'imagenot'"),
        (lambda p: p["evaluate"].update(sets=["nope"]), "evaluate.sets: 'nope' is not defined under eval_sets"),
        (lambda p: p["zeroshot"].update(templates="openai_imagenett"), "zeroshot.templates"),
        (lambda p: p["posthoc"]["wise"].update(runs=["ft", "lipsum"]), "posthoc.wise.runs: 'lipsum' is not a selected key of finetune.runs"),
        (lambda p: p["posthoc"]["wise"].update(runs="some"), "posthoc.wise.runs"),
        (lambda p: p["posthoc"]["tpgm"].update(runs=["kd2"]), "posthoc.tpgm.runs: 'kd2' is not a selected key of finetune.runs"),
        (lambda p: p["finetune"].update(select=["ft"]), "posthoc.tpgm.runs: 'lipsum-ft' is not a selected key"),
        (lambda p: p["distill"].update(student="teacher-rn"),
         "distill.student: timm model 'teacher-rn' has no checkpoint (models.teacher-rn.checkpoint"),
        (lambda p: p["distill"].update(student="teacher-rn"),
         "distill.runs.zs-ours: method 'three-head' (setup zeroshot) needs a CLIP start point; distill.student 'teacher-rn' is a timm model"),
        (lambda p: p["finetune"].update(model="teacher-rn"),
         "finetune.runs.lipsum-ft: method 'lipsum-ft' (setup visual) needs a CLIP start point; finetune.model 'teacher-rn'"),
        (lambda p: p["finetune"].update(model="teacher-rn"), "finetune.model: timm model 'teacher-rn' has no checkpoint"),
        (lambda p: p["finetune"].update(model="teacher-rn"), "finetune.corpus_split: 'pretrain' feeds Lipsum-FT's text tower"),
        (lambda p: p["finetune"].update(model="teacher-rn"),
         "posthoc.tpgm.runs: ['ft', 'lipsum-ft'] — tpgm is not supported from a timm start ('teacher-rn')"),
        (lambda p: p["distill"].update(student="teacher-rn"), "distill.runs.vpt: method 'vpt-shallow' (setup visual) needs"),
        (lambda p: p["distill"]["runs"]["ours"].update(params={"cache_prefix": True}),
         "distill.runs.ours: cache_prefix needs recipe augment: none (a cached clean row must be the same image every epoch), got 'shift'"),
    ],
)
def test_bad_params_name_the_key(repo, default_params, mutate, named):
    params = copy.deepcopy(default_params)
    mutate(params)
    with pytest.raises(ConfigError) as err:
        _validate(repo, params)
    assert named in str(err.value)


def test_null_checkpoint_only_for_the_pretrained_model(repo, default_params):
    params = copy.deepcopy(default_params)
    params["models"]["other"] = {"family": "open_clip", "arch": "tinyclip-rn32", "checkpoint": None}
    params["zeroshot"]["models"] = ["tinyclip", "other"]
    with pytest.raises(ConfigError, match="models.other.checkpoint"):
        _validate(repo, params)


def test_override_file_merges_nested_keys(repo, tmp_path):
    override = tmp_path / "small.yaml"
    override.write_text("pretrain: {steps: 7}\n")
    params = load_params(repo / "params.yaml", override, schema_path=repo / "workflow/schemas/params.schema.yaml")
    assert params["pretrain"]["steps"] == 7
    assert params["pretrain"]["lr"] == 0.002  # untouched siblings survive the merge


def test_unreadable_yaml_names_the_file(repo, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_params(bad, schema_path=repo / "workflow/schemas/params.schema.yaml")


def test_section_names_unknown_and_missing_keys():
    with pytest.raises(ConfigError, match=r"pretrain: unknown key\(s\) stepz"):
        section(PretrainConfig, '{"stepz": 1}', "pretrain")
    with pytest.raises(ConfigError, match="missing key"):
        section(PretrainConfig, {"model": "m"}, "pretrain")


def test_snakemake_refuses_a_mistyped_key_before_any_job(repo, tmp_path):
    """The whole chain: Snakefile → validate → error naming the key, nothing executed."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["ece_binz"] = 10
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--cores", "1", "all"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "unknown key evaluate.ece_binz" in proc.stdout + proc.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()
