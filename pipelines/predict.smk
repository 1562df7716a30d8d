# Each fold's model predicts the validation cases of its fold, from the ingested scans
# (original geometry), so every mask comes from a model that did not see that case.
# The rule's output is the folder's cases.csv, which predict writes last, and not the folder:
# Snakemake removes a job's outputs before it runs it again, so a killed predict keeps its
# finished cases and resumes (--replace-others: a folder of other models or settings is
# started afresh).
PREDICT_SHELL = (
    "medseg predict --input {input.manifest} --splits {input.splits} --fold {wildcards.fold} "
    "--model-info {input.info} --output {params.out} --replace-others --params {params.cfg} "
    "--tracking-uri {params.uri} > {log} 2>&1"
)


rule predict:
    input:
        manifest=rules.ingest.output.manifest,
        splits=rules.plan.output.splits,
        info=rules.train.output.info,
    output:
        f"{RESULTS}/predictions/fold_{{fold}}/cases.csv",
    params:
        out=lambda w, output: os.path.dirname(output[0]),
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
        f"{CONFIGURATION}/predictions/fold_{{fold}}/cases.csv",
    params:
        out=lambda w, output: os.path.dirname(output[0]),
        cfg=configuration_section(CONFIGURATIONS, "predict"),
        uri=TRACKING_URI,
    threads: workflow.cores
    log:
        f"{RESULTS}/logs/configurations/{{configuration}}/predict/fold_{{fold}}.log",
    shell:
        PREDICT_SHELL


# new_scans: scans outside the dataset, predicted with the ensemble of this run's fold models, with
# the settings they were validated with (evaluate's validated.json: flips, overlap, weighting and the
# largest-component decision of the cross-validation), split into new_scans.shards jobs
# (one per GPU, or per node under the SLURM profile). The shards share one folder; each marks
# its end with a file under .shards/, and predict_new (the same command without --shard)
# predicts whatever a shard left and writes the folder's cases.csv.
NEW_SCANS = CFG["new_scans"]
NEW_OUT = (NEW_SCANS["output"] or f"{RESULTS}/new_scans").rstrip("/")
NEW_SHELL = (
    "medseg predict --input {params.scans} --output {params.out} --model-info {input.infos} --replace-others "
    "--params {params.cfg} --tracking-uri {params.uri}"
)
NEW_SHARD_SHELL = f"{NEW_SHELL} --shard {{wildcards.shard}}/{{params.n}} > {{log}} 2>&1 && touch {{output}}"
NEW_ALL_SHELL = f"{NEW_SHELL} > {{log}} 2>&1"


if NEW_SCANS["input"]:

    rule predict_new_shard:
        input:
            infos=expand(f"{RESULTS}/train/fold_{{fold}}/model.json", fold=FOLDS),
            validated=expand(f"{RESULTS}/train/fold_{{fold}}/validated.json", fold=FOLDS),
        output:
            f"{NEW_OUT}/.shards/{{shard}}-of-{NEW_SCANS['shards']}.done",
        params:
            scans=NEW_SCANS["input"],
            out=NEW_OUT,
            cfg=new_scans_predict_arg(CFG),
            uri=TRACKING_URI,
            n=NEW_SCANS["shards"],
        threads: workflow.cores
        log:
            f"{RESULTS}/logs/predict_new/shard_{{shard}}.log",
        shell:
            NEW_SHARD_SHELL

    rule predict_new:
        input:
            shards=expand(f"{NEW_OUT}/.shards/{{shard}}-of-{NEW_SCANS['shards']}.done",
                          shard=range(NEW_SCANS["shards"])),
            infos=expand(f"{RESULTS}/train/fold_{{fold}}/model.json", fold=FOLDS),
            validated=expand(f"{RESULTS}/train/fold_{{fold}}/validated.json", fold=FOLDS),
        output:
            f"{NEW_OUT}/cases.csv",
        params:
            scans=NEW_SCANS["input"],
            out=NEW_OUT,
            cfg=new_scans_predict_arg(CFG),
            uri=TRACKING_URI,
        threads: workflow.cores
        log:
            f"{RESULTS}/logs/predict_new/all.log",
        shell:
            NEW_ALL_SHELL
