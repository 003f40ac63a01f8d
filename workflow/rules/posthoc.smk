rule tpgm:
    """TPGM / TPGM-C: per-tensor projection radii of one fine-tuned run, learned on the val split."""
    input:
        finetuned="models/ft/{model}/{run}/s{seed}/classifier.json",
        zeroshot="models/zeroshot/{model}/classifier.json",
        manifest=dataset_manifest(FT["dataset"]),
    output:
        clf="models/posthoc/{kind}/{model}/{run}/s{seed}/classifier.json",
        encoder="models/posthoc/{kind}/{model}/{run}/s{seed}/encoder.safetensors",
        head="models/posthoc/{kind}/{model}/{run}/s{seed}/head.safetensors",
        record="models/posthoc/{kind}/{model}/{run}/s{seed}/posthoc.json",
    log:
        "logs/posthoc/{kind}/{model}/{run}/s{seed}.log",
    wildcard_constraints:
        kind="tpgm|tpgm-c",
    conda:
        "../../environment.yml"
    threads: config["resources"]["posthoc"]["threads"]
    resources:
        **resources_for("posthoc"),
    params:
        cfg=lambda w: as_json(POSTHOC[w.kind]["params"]),
        val=val_args(),
        finetuned=subpath(input.finetuned, parent=True),
        zeroshot=subpath(input.zeroshot, parent=True),
        out=subpath(output.clf, parent=True),
    shell:
        "robustify posthoc --kind {wildcards.kind} --params {params.cfg:q} --finetuned {params.finetuned:q}"
        " --zeroshot {params.zeroshot:q} {params.val} --seed {wildcards.seed} --out {params.out:q}"
        " --threads {threads} --wildcard kind={wildcards.kind} --wildcard run={wildcards.run}"
        " --wildcard seed={wildcards.seed} > {log:q} 2>&1"


if SOUP_KINDS:

    rule soups:
        """Uniform soup, greedy soup, greedy ensemble of all seeds of one run (chosen on the val split)."""
        input:
            members=lambda w: [
                f"models/ft/{w.model}/{w.run}/s{seed}/classifier.json"
                for seed in run_seeds(w.run)
            ],
            manifest=dataset_manifest(FT["dataset"]),
        output:
            expand(
                "models/posthoc/{kind}/{{model}}/{{run}}/classifier.json",
                kind=SOUP_KINDS,
            ),
        log:
            "logs/posthoc/soups/{model}/{run}.log",
        conda:
            "../../environment.yml"
        threads: config["resources"]["posthoc"]["threads"]
        resources:
            **resources_for("posthoc"),
        params:
            val=val_args(),
            members=lambda w, input: " ".join(os.path.dirname(p) for p in input.members),
            outs=lambda w: as_json(
                {
                    kind: f"models/posthoc/{kind}/{w.model}/{w.run}"
                    for kind in SOUP_KINDS
                }
            ),
        shell:
            "robustify soups --members {params.members} --out-dirs {params.outs:q} {params.val}"
            " --threads {threads} --wildcard run={wildcards.run} > {log:q} 2>&1"


rule posthoc_all:
    """DVC target of the `posthoc` stage."""
    input:
        expand("models/posthoc/{clf}/classifier.json", clf=posthoc_ids()),
