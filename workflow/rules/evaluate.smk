rule evaluate:
    """One classifier × one eval set → metrics parquet (accuracy, ECE, NLL; DESIGN §5 schema)."""
    input:
        clf="models/{clf}/classifier.json",
        manifest=lambda w: dataset_manifest(config["eval_sets"][w.eval_set]["dataset"]),
    output:
        "results/metrics/{clf}/{eval_set}.parquet",
    log:
        "logs/evaluate/{clf}/{eval_set}.log",
    conda:
        "../../environment.yml"
    threads: config["resources"]["evaluate"]["threads"]
    resources:
        **resources_for("evaluate"),
    params:
        # Not `sets`: choosing which sets run must not rerun the others.
        cfg=as_json({k: v for k, v in config["evaluate"].items() if k != "sets"}),
        # Not `clean`: it only pairs sets for the report.
        eval_set=lambda w: as_json(
            {k: v for k, v in config["eval_sets"][w.eval_set].items() if k != "clean"}
        ),
        root=subpath(input.manifest, parent=True),
        clf_dir=subpath(input.clf, parent=True),
        type=lambda w: dataset_type(config["eval_sets"][w.eval_set]["dataset"]),
        options=lambda w: as_json(
            dataset_options(config["eval_sets"][w.eval_set]["dataset"])
        ),
    shell:
        "robustify evaluate --params {params.cfg:q} --classifier {params.clf_dir:q}"
        " --eval-name {wildcards.eval_set} --eval-set {params.eval_set:q}"
        " --dataset-root {params.root:q} --dataset-type {params.type}"
        " --dataset-options {params.options:q} --out {output:q} --threads {threads}"
        " --wildcard clf={wildcards.clf} --wildcard eval_set={wildcards.eval_set} > {log:q} 2>&1"


rule evaluate_all:
    """DVC target of the `evaluate` stage."""
    input:
        metric_files(),


rule evaluate_finetuned:
    """A fine-tuned run of posthoc.wise.runs and its WiSE-FT α sweep on every finetune.eval_sets set,
    one pass per set (each image decoded once for all α), with energy gaps against the zero-shot tower.
    """
    input:
        clf="models/ft/{model}/{run}/s{seed}/classifier.json",
        zeroshot=lambda w: f"{start_classifier(w.model)}/classifier.json",
        manifests=[
            dataset_manifest(config["eval_sets"][s]["dataset"]) for s in FT_EVAL_SETS
        ],
    output:
        expand(
            "results/metrics/ft/{{model}}/{{run}}/s{{seed}}/{eval_set}.parquet",
            eval_set=FT_EVAL_SETS,
        ),
        expand(
            "results/metrics/wise/{{model}}/{{run}}/s{{seed}}/a{alpha}/{eval_set}.parquet",
            alpha=WISE_ALPHAS,
            eval_set=FT_EVAL_SETS,
        ),
        cost="results/metrics/ft/{model}/{run}/s{seed}/cost.parquet",
    log:
        "logs/evaluate/ft/{model}/{run}/s{seed}.log",
    wildcard_constraints:
        run=runs_regex(WISE_RUNS),
    conda:
        "../../environment.yml"
    threads: config["resources"]["evaluate"]["threads"]
    resources:
        **resources_for("evaluate"),
    params:
        cfg=as_json({k: v for k, v in config["evaluate"].items() if k != "sets"}),
        sets=eval_sets_json(FT_EVAL_SETS),
        gap=energy_gap_args(),
        alphas=as_json(POSTHOC["wise"]["alphas"]),
        clf=subpath(input.clf, parent=True),
        zeroshot=subpath(input.zeroshot, parent=True),
    shell:
        "robustify evaluate-tuned --params {params.cfg:q} --classifier {params.clf:q} --sets {params.sets:q}"
        " {params.gap} --zeroshot {params.zeroshot:q} --wise-alphas {params.alphas:q}"
        " --out-dir results/metrics/ft/{wildcards.model}/{wildcards.run}/s{wildcards.seed}"
        " --wise-out-dir results/metrics/wise/{wildcards.model}/{wildcards.run}/s{wildcards.seed}"
        " --cost-out {output.cost:q}"
        " --threads {threads} --wildcard model={wildcards.model} --wildcard run={wildcards.run}"
        " --wildcard seed={wildcards.seed} > {log:q} 2>&1"


rule evaluate_finetuned_alone:
    """A fine-tuned run outside posthoc.wise.runs on every finetune.eval_sets set (no α sweep), with
    energy gaps against the zero-shot tower."""
    input:
        clf="models/ft/{model}/{run}/s{seed}/classifier.json",
        manifests=[
            dataset_manifest(config["eval_sets"][s]["dataset"]) for s in FT_EVAL_SETS
        ],
    output:
        expand(
            "results/metrics/ft/{{model}}/{{run}}/s{{seed}}/{eval_set}.parquet",
            eval_set=FT_EVAL_SETS,
        ),
        cost="results/metrics/ft/{model}/{run}/s{seed}/cost.parquet",
    log:
        "logs/evaluate/ft/{model}/{run}/s{seed}.log",
    wildcard_constraints:
        run=runs_regex([r for r in FT_RUNS if r not in WISE_RUNS]),
    conda:
        "../../environment.yml"
    threads: config["resources"]["evaluate"]["threads"]
    resources:
        **resources_for("evaluate"),
    params:
        cfg=as_json({k: v for k, v in config["evaluate"].items() if k != "sets"}),
        sets=eval_sets_json(FT_EVAL_SETS),
        gap=energy_gap_args(),
        clf=subpath(input.clf, parent=True),
    shell:
        "robustify evaluate-tuned --params {params.cfg:q} --classifier {params.clf:q} --sets {params.sets:q}"
        " {params.gap} --out-dir results/metrics/ft/{wildcards.model}/{wildcards.run}/s{wildcards.seed}"
        " --cost-out {output.cost:q} --threads {threads} --wildcard model={wildcards.model} --wildcard run={wildcards.run}"
        " --wildcard seed={wildcards.seed} > {log:q} 2>&1"


rule evaluate_posthoc:
    """A post-hoc classifier (TPGM, TPGM-C, soup, greedy ensemble) on every finetune.eval_sets set."""
    input:
        clf="models/posthoc/{pclf}/classifier.json",
        manifests=[
            dataset_manifest(config["eval_sets"][s]["dataset"]) for s in FT_EVAL_SETS
        ],
    output:
        expand("results/metrics/{{pclf}}/{eval_set}.parquet", eval_set=FT_EVAL_SETS),
    log:
        "logs/evaluate/{pclf}.log",
    wildcard_constraints:
        pclf=r"(tpgm|tpgm-c)/[^/]+/[^/]+/s\d+|(uniform-soup|greedy-soup|greedy-ensemble)/[^/]+/[^/]+",
    conda:
        "../../environment.yml"
    threads: config["resources"]["evaluate"]["threads"]
    resources:
        **resources_for("evaluate"),
    params:
        cfg=as_json({k: v for k, v in config["evaluate"].items() if k != "sets"}),
        sets=eval_sets_json(FT_EVAL_SETS),
        gap=energy_gap_args(),
        clf=subpath(input.clf, parent=True),
    shell:
        "robustify evaluate-tuned --params {params.cfg:q} --classifier {params.clf:q} --sets {params.sets:q}"
        " {params.gap} --out-dir results/metrics/{wildcards.pclf} --threads {threads}"
        " --wildcard clf={wildcards.pclf} > {log:q} 2>&1"
