PLAN_SHELL = "medseg plan --manifest {input.manifest} --output {params.out} --params {params.cfg} > {log} 2>&1"


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
        PLAN_SHELL


# A configuration of select.configurations that changes the plan or preprocess section plans for itself
# (its split is this run's: the keys that set it cannot change).
rule plan_configuration:
    input:
        manifest=rules.ingest.output.manifest,
    output:
        plan=f"{CONFIGURATION}/plan/plan.json",
        splits=f"{CONFIGURATION}/plan/splits.json",
    params:
        cfg=configuration_section(CONFIGURATIONS, "plan"),
        out=lambda w, output: os.path.dirname(output.plan),
    log:
        f"{RESULTS}/logs/configurations/{{configuration}}/plan.log",
    shell:
        PLAN_SHELL
