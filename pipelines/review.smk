# review: the masks queued for a person to check, flagged cases first (medseg review), with a picture
# of each case. The job builds the folder; a person then serves it and records verdicts:
#   medseg review --output <results>/review --serve
# The outputs are the page and the queue only, so the reviewers' work in the same folder (review.sqlite,
# its export verdicts.csv, corrections/) is not Snakemake's to remove: a rerun keeps it, and marks the
# verdicts on masks that changed as outdated.
REVIEW_SHELL = (
    "medseg review --predictions {params.predictions} --output {params.out} {params.extra} --params {params.cfg} "
    "> {log} 2>&1"
)


rule review:
    input:
        predictions=expand(f"{RESULTS}/predictions/fold_{{fold}}/cases.csv", fold=FOLDS),
        manifest=rules.ingest.output.manifest,
        metrics=rules.evaluate.output.table,
    output:
        page=f"{RESULTS}/review/index.html",
        queue=f"{RESULTS}/review/queue.json",
    params:
        predictions=lambda w, input: [os.path.dirname(p) for p in input.predictions],
        out=lambda w, output: os.path.dirname(output.page),
        extra=lambda w, input: f"--manifest {input.manifest} --evaluation {input.metrics}",
        cfg=section_arg(CFG, "review"),
    log:
        f"{RESULTS}/logs/review/review.log",
    shell:
        REVIEW_SHELL


if NEW_SCANS["input"]:

    rule review_new:
        input:
            f"{NEW_OUT}/cases.csv",
        output:
            page=f"{NEW_OUT}/review/index.html",
            queue=f"{NEW_OUT}/review/queue.json",
        params:
            predictions=NEW_OUT,
            out=lambda w, output: os.path.dirname(output.page),
            extra="",
            cfg=section_arg(CFG, "review"),
        log:
            f"{RESULTS}/logs/review/new_scans.log",
        shell:
            REVIEW_SHELL
