# medseg workflow: ingest -> plan -> preprocess -> train (per fold) -> predict (per fold) -> evaluate -> review
# [-> select: this run against the other configurations of select.configurations, which the workflow
# trains and evaluates the same way, and against finished runs named in select.compare_with].
#
#   snakemake --cores all --configfile configs/experiments/hippocampus.yaml --config dataset=<folder>
#
# The config is validated against configs/schema.json (generated from medseg/config.py)
# before any job runs. Each rule passes only its own config section, so changing one
# section reruns that stage and the stages after it.
import os

from snakemake.utils import min_version, validate

min_version("8.0")


configfile: os.path.join(workflow.basedir, "configs", "config.yaml")


validate(config, os.path.join(workflow.basedir, "configs", "schema.json"), set_default=False)


include: "pipelines/common.smk"
include: "pipelines/ingest.smk"
include: "pipelines/plan.smk"
include: "pipelines/preprocess.smk"
include: "pipelines/train.smk"
include: "pipelines/predict.smk"
include: "pipelines/evaluate.smk"
include: "pipelines/review.smk"
include: "pipelines/select.smk"


rule all:
    input:
        f"{RESULTS}/evaluation/summary.json",
        f"{RESULTS}/review/index.html",
        [f"{RESULTS}/selection.json"] if SELECTING else [],
        [f"{NEW_OUT}/review/index.html"] if NEW_SCANS["input"] else [],
    default_target: True
