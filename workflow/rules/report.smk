# With fine-tuning runs the report also renders the Lipsum-FT tables, the WiSE/energy-gap plots and
# the paper claims checked against this run's numbers.
FINETUNE_REPORT = (
    {
        "finetune_md": "results/tables/finetune.md",
        "finetune_tex": "results/tables/finetune.tex",
        "wise_curves": "results/plots/wise_curves.png",
        "energy_gap": "results/plots/energy_gap.png",
        "claims": "results/claims.md",
    }
    if FT_RUNS
    else {}
)
# With distillation runs: the "Efficiently Robustify" tables, the Pareto plot, and its claims.
DISTILL_REPORT = (
    {
        "distill_md": "results/tables/distill.md",
        "distill_tex": "results/tables/distill.tex",
        "pareto": "results/plots/distill_pareto.png",
        "claims": "results/claims.md",
    }
    if DISTILL_RUNS
    else {}
)


rule report:
    """All metric parquets → all_metrics.parquet, the results tables and summary.json."""
    input:
        metric_files(),
    output:
        **{**FINETUNE_REPORT, **DISTILL_REPORT},
        metrics="results/all_metrics.parquet",
        table="results/tables/zeroshot.md",
        robustness="results/tables/robustness.md",
        summary="results/summary.json",
    log:
        "logs/report.log",
    conda:
        "../../environment.yml"
    threads: config["resources"]["report"]["threads"]
    resources:
        **resources_for("report"),
    params:
        out=subpath(output.metrics, parent=True),
        clean=as_json(clean_sets()),
        er=as_json(config["report"]["effective_robustness"]),
        ft="--finetune-report" if FT_RUNS else "",
        claims=(
            f"--wise-alpha {config['report']['wise_alpha']}"
            f" --claim-tolerance {config['report']['claim_tolerance']}"
        ),
        distill="--distill-report" if DISTILL_RUNS else "",
        fr=lambda w: (
            ""
            if config["report"]["flip_rate_baseline"] is None
            else f"--flip-rate-baseline {config['report']['flip_rate_baseline']}"
        ),
    shell:
        "robustify report --inputs {input:q} --out-dir {params.out:q}"
        " --clean-sets {params.clean:q} --effective-robustness {params.er:q} {params.fr} {params.ft} {params.distill}"
        " {params.claims}"
        " > {log:q} 2>&1"
