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
        "medseg preprocess --manifest {input.manifest} --plan {input.plan} --output {params.out} "
        "--params {params.cfg} > {log} 2>&1"
