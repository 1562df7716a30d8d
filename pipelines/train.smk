# Snakemake empties a job's log before each try, so a failed try's lines (a train job stopped before
# its SLURM time limit exits 75, and the retry resumes it) are appended to <log>.failed as well.
TRAIN_SHELL = (
    "{params.launcher} train --preprocessed {params.pre} --plan {input.plan} --splits {input.splits} "
    "--fold {wildcards.fold} --output {params.out} --manifest {input.manifest} "
    "--params {params.cfg} --tracking-params {params.tracking} --tracking-uri {params.uri} "
    "--artifact-root {params.artifacts} --tag snakemake.rule={params.rule} --resume-if-present > {log} 2>&1 "
    "|| {{ status=$?; {{ echo \"--- failed with exit status $status at $(date -Iseconds) on $(hostname)\"; "
    "cat {log}; }} >> {log}.failed; exit $status; }}"
)


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
        rule="train",
    threads: workflow.cores
    resources:
        gpu=TRAIN_GPUS,
    log:
        f"{RESULTS}/logs/train/fold_{{fold}}.log",
    shell:
        TRAIN_SHELL


# A configuration of select.configurations: this run's folds on this run's split, with its own
# train section, plan and cases (this run's where it changes neither), and registered model.
rule train_configuration:
    input:
        index=configuration_input(
            OWN_PREPROCESSING, f"{CONFIGURATION}/preprocessed/index.json", rules.preprocess.output.index
        ),
        plan=configuration_input(OWN_PREPROCESSING, f"{CONFIGURATION}/plan/plan.json", rules.plan.output.plan),
        splits=rules.plan.output.splits,
        manifest=rules.ingest.output.manifest,
    output:
        info=f"{CONFIGURATION}/train/fold_{{fold}}/model.json",
    params:
        cfg=configuration_section(CONFIGURATIONS, "train"),
        tracking=configuration_section(CONFIGURATIONS, "tracking"),
        uri=TRACKING_URI,
        pre=lambda w, input: os.path.dirname(input.index),
        out=lambda w, output: os.path.dirname(output.info),
        artifacts=f"{RESULTS}/mlartifacts",
        launcher=lambda w: train_launcher(CONFIGURATIONS[w.configuration]),
        rule="train_configuration",
    threads: workflow.cores
    resources:
        gpu=lambda w: train_gpus(CONFIGURATIONS[w.configuration]),
    log:
        f"{RESULTS}/logs/configurations/{{configuration}}/train/fold_{{fold}}.log",
    shell:
        TRAIN_SHELL
