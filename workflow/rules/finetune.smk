rule finetune:
    """One fine-tuning run: a registered method from the zero-shot classifier (SPEC §2, one loop)."""
    input:
        zeroshot=lambda w: f"{start_classifier(w.model)}/classifier.json",
        manifest=dataset_manifest(FT["dataset"]),
    output:
        clf="models/ft/{model}/{run}/s{seed}/classifier.json",
        encoder="models/ft/{model}/{run}/s{seed}/encoder.safetensors",
        head="models/ft/{model}/{run}/s{seed}/head.safetensors",
        history="models/ft/{model}/{run}/s{seed}/history.json",
    log:
        "logs/finetune/{model}/{run}/s{seed}.log",
    conda:
        "../../environment.yml"
    threads: config["resources"]["finetune"]["threads"]
    resources:
        **resources_for("finetune"),
    params:
        recipe=lambda w: as_json(run_recipe(w.run)),
        method=lambda w: FT_RUNS[w.run]["method"],
        method_params=lambda w: as_json(FT_RUNS[w.run].get("params", {})),
        domain=f"--domain {FT['domain']}" if FT["domain"] else "",
        corpus=f"--corpus-split {FT['corpus_split']}" if FT["corpus_split"] else "",
        root=subpath(input.manifest, parent=True),
        type=dataset_type(FT["dataset"]),
        options=as_json(dataset_options(FT["dataset"])),
        train_dataset=FT["dataset"],
        splits=f"--train-split {FT['train_split']} --val-split {FT['val_split']}",
        zeroshot=subpath(input.zeroshot, parent=True),
        out=subpath(output.clf, parent=True),
    shell:
        "robustify finetune --params {params.recipe:q} --method {params.method}"
        " --method-params {params.method_params:q} --model-name {wildcards.model} --run-name {wildcards.run}"
        " --seed {wildcards.seed} --zeroshot {params.zeroshot:q} --dataset-root {params.root:q}"
        " --dataset-type {params.type} --dataset-options {params.options:q} {params.domain}"
        " {params.splits} {params.corpus}"
        " --train-dataset {params.train_dataset} --out {params.out:q} --threads {threads}"
        " --wildcard model={wildcards.model} --wildcard run={wildcards.run}"
        " --wildcard seed={wildcards.seed} > {log:q} 2>&1"


rule finetune_all:
    """DVC target of the `finetune` stage."""
    input:
        expand("models/{clf}/classifier.json", clf=finetuned_ids()),
