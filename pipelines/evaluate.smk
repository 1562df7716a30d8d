rule evaluate:
    input:
        predictions=expand(f"{RESULTS}/predictions/fold_{{fold}}", fold=FOLDS),
        manifest=rules.ingest.output.manifest,
        infos=expand(f"{RESULTS}/train/fold_{{fold}}/model.json", fold=FOLDS),
    output:
        summary=f"{RESULTS}/evaluation/summary.json",
        table=f"{RESULTS}/evaluation/metrics.csv",
        plot=f"{RESULTS}/evaluation/metrics.png",
    params:
        cfg=section_arg(CFG, "evaluate"),
        uri=TRACKING_URI,
        out=lambda w, output: os.path.dirname(output.summary),
    log:
        f"{RESULTS}/logs/evaluate/evaluate.log",
    shell:
        "medseg evaluate --predictions {input.predictions} --manifest {input.manifest} --output {params.out} "
        "--model-info {input.infos} --params {params.cfg} --tracking-uri {params.uri} > {log} 2>&1"
