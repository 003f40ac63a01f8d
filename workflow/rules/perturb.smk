rule perturb:
    """One shard of an ImageNet-P-style set: source items shard::shards under one perturbation."""
    input:
        manifest=lambda w: dataset_manifest(config["perturb"][w.pset]["dataset"]),
    output:
        "data/{pset}/shards/{perturbation}/{shard}.parquet",
    log:
        "logs/perturb/{pset}/{perturbation}/{shard}.log",
    conda:
        "../../environment.yml"
    threads: config["resources"]["perturb"]["threads"]
    resources:
        **resources_for("perturb"),
    params:
        cfg=lambda w: as_json(config["perturb"][w.pset]),
        root=subpath(input.manifest, parent=True),
        type=lambda w: dataset_type(config["perturb"][w.pset]["dataset"]),
        options=lambda w: as_json(dataset_options(config["perturb"][w.pset]["dataset"])),
        out=lambda w: dataset_root(w.pset),
        seed=config["seed"],
    shell:
        "robustify perturb --name {wildcards.pset} --params {params.cfg:q}"
        " --source-root {params.root:q} --source-type {params.type}"
        " --source-options {params.options:q} --perturbation {wildcards.perturbation}"
        " --shard {wildcards.shard} --out {params.out:q} --seed {params.seed}"
        " --threads {threads} --wildcard pset={wildcards.pset}"
        " --wildcard perturbation={wildcards.perturbation} --wildcard shard={wildcards.shard}"
        " > {log:q} 2>&1"


rule perturb_merge:
    """A sequence set's shards → its manifest.parquet, rejects.parquet and dataset.json."""
    input:
        shards=lambda w: perturb_shards(w.pset),
        source=lambda w: dataset_manifest(config["perturb"][w.pset]["dataset"]),
    output:
        manifest="data/{pset}/manifest.parquet",
        info="data/{pset}/dataset.json",
        rejects="data/{pset}/rejects.parquet",
    log:
        "logs/perturb/{pset}/merge.log",
    conda:
        "../../environment.yml"
    resources:
        **resources_for("perturb"),
    params:
        cfg=lambda w: as_json(config["perturb"][w.pset]),
        root=subpath(input.source, parent=True),
        out=subpath(output.manifest, parent=True),
        seed=config["seed"],
    shell:
        "robustify perturb-merge --name {wildcards.pset} --params {params.cfg:q}"
        " --source-root {params.root:q} --shards {input.shards:q} --out {params.out:q}"
        " --seed {params.seed} --wildcard pset={wildcards.pset} > {log:q} 2>&1"


rule perturb_all:
    """DVC target of the `perturb` stage: every sequence set under `perturb:`."""
    input:
        [dataset_manifest(k) for k in config["perturb"]],
