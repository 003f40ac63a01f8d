rule pretrain:
    """Contrastive pre-training of a small open_clip model (random init) on the caption pairs."""
    input:
        manifest=dataset_manifest(config["pretrain"]["dataset"]),
    output:
        model="models/pretrained/{model}/model.safetensors",
        config="models/pretrained/{model}/config.json",
    log:
        "logs/pretrain/{model}.log",
    conda:
        "../../environment.yml"
    threads: config["resources"]["pretrain"]["threads"]
    resources:
        **resources_for("pretrain"),
    params:
        cfg=as_json(config["pretrain"]),
        spec=lambda w: as_json(config["models"][w.model]),
        seed=config["seed"],
        root=subpath(input.manifest, parent=True),
        out=subpath(output.model, parent=True),
    shell:
        "robustify pretrain --params {params.cfg:q} --model-spec {params.spec:q} --seed {params.seed}"
        " --dataset-root {params.root:q} --out {params.out:q} --threads {threads}"
        " --wildcard model={wildcards.model} > {log:q} 2>&1"


rule pretrain_all:
    """DVC target of the `pretrain` stage."""
    input:
        f"models/pretrained/{config['pretrain']['model']}/model.safetensors",
