# The out-of-fold predictions of all folds, scored together in each scan's own geometry. Each fold's
# model is given the settings it was validated with (validated.json beside its checkpoint, and in the
# registry), which medseg predict then uses for it by default.
EVALUATE_SHELL = (
    "medseg evaluate --predictions {params.predictions} --manifest {input.manifest} --output {params.out} "
    "--model-info {input.infos} --params {params.cfg} --tracking-uri {params.uri} > {log} 2>&1"
)


rule evaluate:
    input:
        predictions=expand(f"{RESULTS}/predictions/fold_{{fold}}/cases.csv", fold=FOLDS),
        manifest=rules.ingest.output.manifest,
        infos=expand(f"{RESULTS}/train/fold_{{fold}}/model.json", fold=FOLDS),
    output:
        summary=f"{RESULTS}/evaluation/summary.json",
        table=f"{RESULTS}/evaluation/metrics.csv",
        plot=f"{RESULTS}/evaluation/metrics.png",
        postprocessing=f"{RESULTS}/evaluation/postprocessing.json",
        validated=expand(f"{RESULTS}/train/fold_{{fold}}/validated.json", fold=FOLDS),
    params:
        cfg=section_arg(CFG, "evaluate"),
        uri=TRACKING_URI,
        out=lambda w, output: os.path.dirname(output.summary),
        predictions=lambda w, input: [os.path.dirname(p) for p in input.predictions],
    log:
        f"{RESULTS}/logs/evaluate/evaluate.log",
    shell:
        EVALUATE_SHELL


rule evaluate_configuration:
    input:
        predictions=expand(f"{CONFIGURATION}/predictions/fold_{{fold}}/cases.csv", fold=FOLDS, allow_missing=True),
        manifest=rules.ingest.output.manifest,
        infos=expand(f"{CONFIGURATION}/train/fold_{{fold}}/model.json", fold=FOLDS, allow_missing=True),
    output:
        summary=f"{CONFIGURATION}/evaluation/summary.json",
        table=f"{CONFIGURATION}/evaluation/metrics.csv",
        plot=f"{CONFIGURATION}/evaluation/metrics.png",
        postprocessing=f"{CONFIGURATION}/evaluation/postprocessing.json",
        validated=expand(f"{CONFIGURATION}/train/fold_{{fold}}/validated.json", fold=FOLDS, allow_missing=True),
    params:
        cfg=section_arg(CFG, "evaluate"),
        uri=TRACKING_URI,
        out=lambda w, output: os.path.dirname(output.summary),
        predictions=lambda w, input: [os.path.dirname(p) for p in input.predictions],
    log:
        f"{RESULTS}/logs/configurations/{{configuration}}/evaluate.log",
    shell:
        EVALUATE_SHELL
