# With select.compare_with set: this run against other finished runs (each its own results folder,
# trained with its own config: 2D against 3D, another network), the best by cross-validated Dice.
import shlex

SELECT_CANDIDATES = {CFG["select"]["name"]: RESULTS, **CFG["select"]["compare_with"]}


rule select:
    input:
        this=rules.evaluate.output.table,
        others=[f"{folder}/evaluation/metrics.csv" for folder in CFG["select"]["compare_with"].values()],
    output:
        f"{RESULTS}/selection.json",
    params:
        candidates=" ".join(shlex.quote(f"--candidate={n}={f}") for n, f in SELECT_CANDIDATES.items()),
    log:
        f"{RESULTS}/logs/select/select.log",
    shell:
        "medseg select {params.candidates} --output {output} > {log} 2>&1"
