rule report:
    """All metric parquets → all_metrics.parquet, the results tables and summary.json."""
    input:
        metric_files(),
    output:
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
        fr=lambda w: (
            ""
            if config["report"]["flip_rate_baseline"] is None
            else f"--flip-rate-baseline {config['report']['flip_rate_baseline']}"
        ),
    shell:
        "robustify report --inputs {input:q} --out-dir {params.out:q}"
        " --clean-sets {params.clean:q} --effective-robustness {params.er:q} {params.fr}"
        " > {log:q} 2>&1"
