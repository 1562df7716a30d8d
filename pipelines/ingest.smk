# A DICOM root is read with {threads} files at once; other inputs one case at a time.
rule ingest:
    input:
        DATASET,
    output:
        manifest=f"{RESULTS}/ingest/manifest.json",
    params:
        cfg=section_arg(CFG, "ingest"),
        out=lambda w, output: os.path.dirname(output.manifest),
    threads: min(8, workflow.cores)
    log:
        f"{RESULTS}/logs/ingest/ingest.log",
    shell:
        "medseg ingest --input {input} --output {params.out} --params {params.cfg} --workers {threads} > {log} 2>&1"
