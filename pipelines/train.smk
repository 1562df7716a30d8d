rule train:
    input:
        index=rules.preprocess.output.index,
        plan=rules.plan.output.plan,
        splits=rules.plan.output.splits,
        manifest=rules.ingest.output.manifest,
    output:
        info=f"{RESULTS}/train/fold_{{fold}}/model.json",
    params:
        cfg=section_arg(CFG, "train"),
        tracking=section_arg(CFG, "tracking"),
        uri=TRACKING_URI,
        pre=lambda w, input: os.path.dirname(input.index),
        out=lambda w, output: os.path.dirname(output.info),
        artifacts=f"{RESULTS}/mlartifacts",
        launcher=TRAIN_LAUNCHER,
    threads: workflow.cores
    resources:
        gpu=TRAIN_GPUS,
    log:
        f"{RESULTS}/logs/train/fold_{{fold}}.log",
    shell:
        "{params.launcher} train --preprocessed {params.pre} --plan {input.plan} --splits {input.splits} "
        "--fold {wildcards.fold} --output {params.out} --manifest {input.manifest} "
        "--params {params.cfg} --tracking-params {params.tracking} --tracking-uri {params.uri} "
        "--artifact-root {params.artifacts} --tag snakemake.rule=train > {log} 2>&1"
