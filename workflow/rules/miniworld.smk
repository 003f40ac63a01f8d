rule miniworld:
    """Generate the embedded mini-world: images + dataset.json + manifest.parquet (written last)."""
    output:
        manifest=f"{config['miniworld']['root']}/manifest.parquet",
        info=f"{config['miniworld']['root']}/dataset.json",
    log:
        "logs/miniworld.log",
    conda:
        "../../environment.yml"
    threads: config["resources"]["miniworld"]["threads"]
    resources:
        **resources_for("miniworld"),
    params:
        cfg=as_json(config["miniworld"]),
        seed=config["seed"],
        root=subpath(output.manifest, parent=True),
    shell:
        "robustify miniworld --params {params.cfg:q} --seed {params.seed} --out {params.root:q}"
        " --threads {threads} > {log:q} 2>&1"
