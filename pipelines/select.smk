# With select.configurations or select.compare_with set: this run against the configurations it trains
# too and against other finished runs (each its own results folder and config), the best by
# cross-validated Dice.
import shlex

SELECT_CANDIDATES = {
    CFG["select"]["name"]: RESULTS,
    **{name: f"{RESULTS}/configurations/{name}" for name in CONFIGURATIONS},
    **CFG["select"]["compare_with"],
}
SELECTING = bool(CONFIGURATIONS or CFG["select"]["compare_with"])


rule select:
    input:
        this=rules.evaluate.output.table,
        configurations=expand(rules.evaluate_configuration.output.table, configuration=list(CONFIGURATIONS)),
        others=[f"{folder}/evaluation/metrics.csv" for folder in CFG["select"]["compare_with"].values()],
    output:
        f"{RESULTS}/selection.json",
    params:
        candidates=" ".join(shlex.quote(f"--candidate={n}={f}") for n, f in SELECT_CANDIDATES.items()),
    log:
        f"{RESULTS}/logs/select/select.log",
    shell:
        "medseg select {params.candidates} --output {output} > {log} 2>&1"
