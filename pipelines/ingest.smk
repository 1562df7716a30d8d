rule ingest:
    input:
        DATASET,
    output:
        manifest=f"{RESULTS}/ingest/manifest.json",
    params:
        cfg=section_arg(CFG, "ingest"),
        out=lambda w, output: os.path.dirname(output.manifest),
    log:
        f"{RESULTS}/logs/ingest/ingest.log",
    shell:
        "medseg ingest --input {input} --output {params.out} --params {params.cfg} > {log} 2>&1"
