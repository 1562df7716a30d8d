# Each fold's model predicts the validation cases of its fold, from the ingested scans
# (original geometry), so every mask comes from a model that did not see that case.
PREDICT_SHELL = (
    "medseg predict --input {input.manifest} --splits {input.splits} --fold {wildcards.fold} "
    "--model-info {input.info} --output {output} --params {params.cfg} --tracking-uri {params.uri} > {log} 2>&1"
)


rule predict:
    input:
        manifest=rules.ingest.output.manifest,
        splits=rules.plan.output.splits,
        info=rules.train.output.info,
    output:
        directory(f"{RESULTS}/predictions/fold_{{fold}}"),
    params:
        cfg=section_arg(CFG, "predict"),
        uri=TRACKING_URI,
    threads: workflow.cores
    log:
        f"{RESULTS}/logs/predict/fold_{{fold}}.log",
    shell:
        PREDICT_SHELL


rule predict_configuration:
    input:
        manifest=rules.ingest.output.manifest,
        splits=rules.plan.output.splits,
        info=rules.train_configuration.output.info,
    output:
        directory(f"{CONFIGURATION}/predictions/fold_{{fold}}"),
    params:
        cfg=configuration_section(CONFIGURATIONS, "predict"),
        uri=TRACKING_URI,
    threads: workflow.cores
    log:
        f"{RESULTS}/logs/configurations/{{configuration}}/predict/fold_{{fold}}.log",
    shell:
        PREDICT_SHELL
