rule corrupt_sources:
    """One shard's sources decoded and resized once for all its corruption × severity jobs; temp:
    deleted once they are all done. Its own Slurm job (not in the `shards` group)."""
    input:
        manifest=lambda w: dataset_manifest(config["corrupt"][w.cset]["dataset"]),
    output:
        pixels=temp("data/{cset}/sources/{shard}.npy"),
        index=temp("data/{cset}/sources/{shard}.parquet"),
    log:
        "logs/corrupt/{cset}/sources/{shard}.log",
    conda:
        "../../environment.yml"
    threads: config["resources"]["corrupt"]["threads"]
    resources:
        **resources_for("corrupt"),
    params:
        cfg=lambda w: as_json(config["corrupt"][w.cset]),
        root=subpath(input.manifest, parent=True),
        type=lambda w: dataset_type(config["corrupt"][w.cset]["dataset"]),
        options=lambda w: as_json(dataset_options(config["corrupt"][w.cset]["dataset"])),
        out=lambda w: dataset_root(w.cset),
        seed=config["seed"],
    shell:
        "robustify corrupt-sources --name {wildcards.cset} --params {params.cfg:q}"
        " --source-root {params.root:q} --source-type {params.type}"
        " --source-options {params.options:q} --shard {wildcards.shard}"
        " --out {params.out:q} --seed {params.seed} --threads {threads}"
        " --wildcard cset={wildcards.cset} --wildcard shard={wildcards.shard}"
        " > {log:q} 2>&1"


rule corrupt:
    """One shard of a corrupted set: source items shard::shards at one corruption × severity, read from
    the shard's decoded sources."""
    input:
        manifest=lambda w: dataset_manifest(config["corrupt"][w.cset]["dataset"]),
        pixels="data/{cset}/sources/{shard}.npy",
        index="data/{cset}/sources/{shard}.parquet",
    output:
        "data/{cset}/shards/{corruption}/{severity}/{shard}.parquet",
    log:
        "logs/corrupt/{cset}/{corruption}/{severity}/{shard}.log",
    conda:
        "../../environment.yml"
    threads: config["resources"]["corrupt"]["threads"]
    resources:
        **resources_for("corrupt"),
    params:
        cfg=lambda w: as_json(config["corrupt"][w.cset]),
        root=subpath(input.manifest, parent=True),
        type=lambda w: dataset_type(config["corrupt"][w.cset]["dataset"]),
        options=lambda w: as_json(dataset_options(config["corrupt"][w.cset]["dataset"])),
        out=lambda w: dataset_root(w.cset),
        seed=config["seed"],
    shell:
        "robustify corrupt --name {wildcards.cset} --params {params.cfg:q}"
        " --source-root {params.root:q} --source-type {params.type}"
        " --source-options {params.options:q} --corruption {wildcards.corruption}"
        " --severity {wildcards.severity} --shard {wildcards.shard} --out {params.out:q}"
        " --sources {input.pixels:q} --seed {params.seed} --threads {threads}"
        " --wildcard cset={wildcards.cset}"
        " --wildcard corruption={wildcards.corruption} --wildcard severity={wildcards.severity}"
        " --wildcard shard={wildcards.shard} > {log:q} 2>&1"


rule corrupt_merge:
    """A corrupted set's shards → its manifest.parquet, rejects.parquet and dataset.json."""
    input:
        shards=lambda w: corrupt_shards(w.cset),
        source=lambda w: dataset_manifest(config["corrupt"][w.cset]["dataset"]),
    output:
        manifest="data/{cset}/manifest.parquet",
        info="data/{cset}/dataset.json",
        rejects="data/{cset}/rejects.parquet",
    log:
        "logs/corrupt/{cset}/merge.log",
    conda:
        "../../environment.yml"
    resources:
        **resources_for("corrupt"),
    params:
        cfg=lambda w: as_json(config["corrupt"][w.cset]),
        root=subpath(input.source, parent=True),
        out=subpath(output.manifest, parent=True),
        seed=config["seed"],
    shell:
        "robustify corrupt-merge --name {wildcards.cset} --params {params.cfg:q}"
        " --source-root {params.root:q} --shards {input.shards:q} --out {params.out:q}"
        " --seed {params.seed} --wildcard cset={wildcards.cset} > {log:q} 2>&1"


rule corrupt_all:
    """DVC target of the `corrupt` stage: every corrupted set under `corrupt:`."""
    input:
        [dataset_manifest(k) for k in config["corrupt"]],
