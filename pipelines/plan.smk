rule plan:
    input:
        manifest=rules.ingest.output.manifest,
    output:
        plan=f"{RESULTS}/plan/plan.json",
        splits=f"{RESULTS}/plan/splits.json",
    params:
        cfg=section_arg(CFG, "plan"),
        out=lambda w, output: os.path.dirname(output.plan),
    log:
        f"{RESULTS}/logs/plan/plan.log",
    shell:
        "medseg plan --manifest {input.manifest} --output {params.out} --params {params.cfg} > {log} 2>&1"
