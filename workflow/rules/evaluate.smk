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
