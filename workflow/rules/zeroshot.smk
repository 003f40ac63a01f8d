rule zeroshot:
    """Zero-shot classifier: template-ensemble head (SPEC §1) over the image tower's checkpoint."""
    input:
        checkpoint=lambda w: model_checkpoint(w.model),
        labels=f"{dataset_root(config['zeroshot']['dataset'])}/dataset.json",
    output:
        clf="models/zeroshot/{model}/classifier.json",
        head="models/zeroshot/{model}/head.safetensors",
    log:
        "logs/zeroshot/{model}.log",
    conda:
        "../../environment.yml"
    threads: config["resources"]["zeroshot"]["threads"]
    resources:
        **resources_for("zeroshot"),
    params:
        # Not the `models` list: adding a model must not rebuild the others' heads.
        cfg=as_json({k: v for k, v in config["zeroshot"].items() if k != "models"}),
        spec=zeroshot_spec,
        train_dataset=pretrained_on,
        seed=config["seed"],
        root=subpath(input.labels, parent=True),
        out=subpath(output.clf, parent=True),
    shell:
        "robustify zeroshot --params {params.cfg:q} --model-name {wildcards.model}"
        " --model-spec {params.spec:q} --train-dataset {params.train_dataset:q} --seed {params.seed}"
        " --dataset-root {params.root:q} --out {params.out:q} --threads {threads}"
        " --wildcard model={wildcards.model} > {log:q} 2>&1"


rule zeroshot_all:
    """DVC target of the `zeroshot` stage."""
    input:
        expand("models/{clf}/classifier.json", clf=ZEROSHOT_CLASSIFIERS),
