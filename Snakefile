# robustify — the whole DAG. `snakemake --cores 2 all` runs the embedded mini-world end to end;
# `snakemake --profile slurm all` runs the same DAG on a Slurm cluster.
# params.yaml is the experiment definition; `--configfile other.yaml` merges on top of it.


configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/miniworld.smk"
include: "workflow/rules/corrupt.smk"
include: "workflow/rules/perturb.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/zeroshot.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/posthoc.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
