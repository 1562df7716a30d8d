# A DICOM root is read with {threads} files at once; other inputs one case at a time.
# ingest.reviewed: review folders whose accepted and corrected masks join the training cases; their
# queue.json and verdicts.csv are inputs, so a new verdict (or a rebuilt review) reruns ingest and
# what follows. A review folder must be another run's (this run's own review depends on ingest).
rule ingest:
    input:
        dataset=DATASET,
        reviewed=reviewed_inputs(CFG),
    output:
        manifest=f"{RESULTS}/ingest/manifest.json",
    params:
        cfg=section_arg(CFG, "ingest"),
        out=lambda w, output: os.path.dirname(output.manifest),
    threads: min(8, workflow.cores)
    log:
        f"{RESULTS}/logs/ingest/ingest.log",
    shell:
        "medseg ingest --input {input.dataset} --output {params.out} --params {params.cfg} --workers {threads} > {log} 2>&1"
