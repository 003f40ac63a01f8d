rule prepare:
    """A real dataset's official layout → data/<key>/manifest.parquet; unreadable files → rejects."""
    input:
        source=lambda w: dataset_source(w.dataset),
    output:
        manifest="data/{dataset}/manifest.parquet",
        info="data/{dataset}/dataset.json",
        rejects="data/{dataset}/rejects.parquet",
    log:
        "logs/prepare/{dataset}.log",
    conda:
        "../../environment.yml"
    threads: config["resources"]["prepare"]["threads"]
    resources:
        **resources_for("prepare"),
    params:
        type=lambda w: dataset_type(w.dataset),
        options=lambda w: as_json(dataset_options(w.dataset)),
        holdout=lambda w: as_json(config["datasets"][w.dataset].get("holdout")),
        out=subpath(output.manifest, parent=True),
    shell:
        "robustify prepare --type {params.type} --source {input.source:q}"
        " --options {params.options:q} --holdout {params.holdout:q} --out {params.out:q} --threads {threads}"
        " --wildcard dataset={wildcards.dataset} > {log:q} 2>&1"
