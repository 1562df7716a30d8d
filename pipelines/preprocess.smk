PREPROCESS_SHELL = (
    "medseg preprocess --manifest {input.manifest} --plan {input.plan} --output {params.out} "
    "--params {params.cfg} > {log} 2>&1"
)


rule preprocess:
    input:
        manifest=rules.ingest.output.manifest,
        plan=rules.plan.output.plan,
    output:
        index=f"{RESULTS}/preprocessed/index.json",
    params:
        cfg=section_arg(CFG, "preprocess"),
        out=lambda w, output: os.path.dirname(output.index),
    threads: CFG["preprocess"]["workers"]
    log:
        f"{RESULTS}/logs/preprocess/preprocess.log",
    shell:
        PREPROCESS_SHELL


rule preprocess_configuration:
    input:
        manifest=rules.ingest.output.manifest,
        plan=rules.plan_configuration.output.plan,
    output:
        index=f"{CONFIGURATION}/preprocessed/index.json",
    params:
        cfg=configuration_section(CONFIGURATIONS, "preprocess"),
        out=lambda w, output: os.path.dirname(output.index),
    threads: lambda w: CONFIGURATIONS[w.configuration]["preprocess"]["workers"]
    log:
        f"{RESULTS}/logs/configurations/{{configuration}}/preprocess.log",
    shell:
        PREPROCESS_SHELL
