rule teacher:
    """A small robust timm teacher (SPEC §3): AugMix + JSD + DeepAugment (or PixMix) on distill.dataset."""
    input:
        manifest=dataset_manifest(DISTILL["dataset"]),
    output:
        clf="models/teachers/{teacher}/classifier.json",
        weights="models/teachers/{teacher}/model.safetensors",
        history="models/teachers/{teacher}/history.json",
    log:
        "logs/teachers/{teacher}.log",
    conda:
        "../../environment.yml"
    threads: config["resources"]["teachers"]["threads"]
    resources:
        **resources_for("teachers"),
    params:
        recipe=lambda w: as_json(config["teachers"][w.teacher]["recipe"]),
        method_params=lambda w: as_json(config["teachers"][w.teacher].get("params", {})),
        spec=lambda w: as_json(teacher_spec(w.teacher)),
        domain=f"--domain {DISTILL['domain']}" if DISTILL["domain"] else "",
        root=subpath(input.manifest, parent=True),
        type=dataset_type(DISTILL["dataset"]),
        options=as_json(dataset_options(DISTILL["dataset"])),
        splits=f"--train-split {DISTILL['train_split']} --val-split {DISTILL['val_split']}",
        train_dataset=DISTILL["dataset"],
        out=subpath(output.clf, parent=True),
    shell:
        "robustify teacher --params {params.recipe:q} --method-params {params.method_params:q}"
        " --teacher-name {wildcards.teacher} --model-spec {params.spec:q} --dataset-root {params.root:q}"
        " --dataset-type {params.type} --dataset-options {params.options:q} {params.domain} {params.splits}"
        " --train-dataset {params.train_dataset} --out {params.out:q} --threads {threads}"
        " --wildcard teacher={wildcards.teacher} > {log:q} 2>&1"


rule import_timm:
    """A pre-trained timm classifier (its own head) as the start point of a unimodal student (Table 3)."""
    input:
        manifest=lambda w: dataset_manifest(timm_start_dataset(w.model)),
    output:
        clf="models/timm/{model}/classifier.json",
        weights="models/timm/{model}/model.safetensors",
    log:
        "logs/timm/{model}.log",
    conda:
        "../../environment.yml"
    threads: config["resources"]["zeroshot"]["threads"]
    resources:
        **resources_for("zeroshot"),
    params:
        spec=lambda w: as_json(model_spec_resolved(w.model)),
        root=subpath(input.manifest, parent=True),
        type=lambda w: dataset_type(timm_start_dataset(w.model)),
        options=lambda w: as_json(dataset_options(timm_start_dataset(w.model))),
        train_dataset=lambda w: timm_start_dataset(w.model),
        out=subpath(output.clf, parent=True),
    shell:
        "robustify import-timm --model-name {wildcards.model} --model-spec {params.spec:q}"
        " --dataset-root {params.root:q} --dataset-type {params.type} --dataset-options {params.options:q}"
        " --train-dataset {params.train_dataset} --out {params.out:q} --threads {threads}"
        " --wildcard model={wildcards.model} > {log:q} 2>&1"


rule distill:
    """One run of the distillation family (three-head student, its ablation, the KD/APT/VPT/ZS baselines)
    from the student's zero-shot classifier (a timm student: its imported classifier), through the one
    fine-tuning loop."""
    input:
        zeroshot=lambda w: f"{start_classifier(w.model)}/classifier.json",
        teacher="models/teachers/{teacher}/classifier.json",
        manifest=dataset_manifest(DISTILL["dataset"]),
    output:
        clf="models/distill/{model}/{teacher}/{drun}/s{seed}/classifier.json",
        history="models/distill/{model}/{teacher}/{drun}/s{seed}/history.json",
    log:
        "logs/distill/{model}/{teacher}/{drun}/s{seed}.log",
    conda:
        "../../environment.yml"
    threads: config["resources"]["distill"]["threads"]
    resources:
        **resources_for("distill"),
    params:
        recipe=lambda w: as_json(distill_recipe(w.drun)),
        method=lambda w: DISTILL_RUNS[w.drun]["method"],
        method_params=lambda w: as_json(distill_params(w.drun)),
        domain=f"--domain {DISTILL['domain']}" if DISTILL["domain"] else "",
        root=subpath(input.manifest, parent=True),
        type=dataset_type(DISTILL["dataset"]),
        options=as_json(dataset_options(DISTILL["dataset"])),
        splits=f"--train-split {DISTILL['train_split']} --val-split {DISTILL['val_split']}",
        train_dataset=DISTILL["dataset"],
        zeroshot=subpath(input.zeroshot, parent=True),
        teacher=subpath(input.teacher, parent=True),
        out=subpath(output.clf, parent=True),
    shell:
        "robustify finetune --params {params.recipe:q} --method {params.method}"
        " --method-params {params.method_params:q} --model-name {wildcards.model} --run-name {wildcards.drun}"
        " --model-id distill/{wildcards.model}/{wildcards.teacher}/{wildcards.drun}/s{wildcards.seed}"
        " --teacher {params.teacher:q} --teacher-name {wildcards.teacher}"
        " --seed {wildcards.seed} --zeroshot {params.zeroshot:q} --dataset-root {params.root:q}"
        " --dataset-type {params.type} --dataset-options {params.options:q} {params.domain} {params.splits}"
        " --train-dataset {params.train_dataset} --out {params.out:q} --threads {threads}"
        " --wildcard model={wildcards.model} --wildcard teacher={wildcards.teacher}"
        " --wildcard run={wildcards.drun} --wildcard seed={wildcards.seed} > {log:q} 2>&1"


rule evaluate_distilled:
    """A teacher or a distillation run on every distill.eval_sets set (three-head students: MC-dropout
    head selection and its ablations) + its training-cost rows."""
    input:
        clf="models/{dclf}/classifier.json",
        manifests=[
            dataset_manifest(config["eval_sets"][s]["dataset"])
            for s in DISTILL_EVAL_SETS
        ],
    output:
        expand(
            "results/metrics/{{dclf}}/{eval_set}.parquet", eval_set=DISTILL_EVAL_SETS
        ),
        cost="results/metrics/{dclf}/cost.parquet",
    log:
        "logs/evaluate/{dclf}.log",
    wildcard_constraints:
        dclf=r"teachers/[^/]+|distill/[^/]+/[^/]+/[^/]+/s\d+",
    conda:
        "../../environment.yml"
    threads: config["resources"]["evaluate"]["threads"]
    resources:
        **resources_for("evaluate"),
    params:
        cfg=as_json({k: v for k, v in config["evaluate"].items() if k != "sets"}),
        sets=eval_sets_json(DISTILL_EVAL_SETS),
        clf=subpath(input.clf, parent=True),
    shell:
        "robustify evaluate-tuned --params {params.cfg:q} --classifier {params.clf:q} --sets {params.sets:q}"
        " --out-dir results/metrics/{wildcards.dclf} --cost-out {output.cost:q} --threads {threads}"
        " --wildcard clf={wildcards.dclf} > {log:q} 2>&1"


rule teachers_all:
    """DVC target of the `teachers` stage."""
    input:
        expand("models/{clf}/classifier.json", clf=teacher_ids()),


rule distill_all:
    """DVC target of the `distill` stage."""
    input:
        expand("models/{clf}/classifier.json", clf=distilled_ids()),
