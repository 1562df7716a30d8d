"""The ``medseg`` command: one subcommand per stage, plus helpers.

Commands are thin: parse arguments, build the config, call the stage function, and turn a
``MedsegError`` (or a full disk: ENOSPC, EDQUOT) into a one-line message and exit status 2.
Heavy imports happen inside the commands so ``medseg --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from medseg.errors import MedsegError

log = logging.getLogger("medseg")

REVIEWED_CASES_ARTIFACT = "data/reviewed_cases.json"  # in a training's fold runs: the reviewed cases' provenance


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, action="append", default=[], metavar="YAML",
                   help="workflow config file(s) to take this stage's section from (repeatable, later wins)")
    p.add_argument("--params", metavar="JSON", help="this stage's section as JSON (wins over --config)")


def _tracking_uri(args: argparse.Namespace) -> str:
    from medseg.tracking import default_tracking_uri

    return args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _section(args: argparse.Namespace, model: type, name: str, params: str | None = None):  # noqa: ANN202
    from medseg.config import section_from_sources

    return section_from_sources(model, name, config_files=args.config, params_json=params if params is not None else args.params)


def cmd_ingest(args: argparse.Namespace) -> None:
    from medseg.config import IngestConfig
    from medseg.stages.ingest import ingest

    source = args.root or args.input
    if source is None or args.output is None:
        from medseg.errors import ConfigError

        raise ConfigError("ingest: expected an input (ROOT or --input) and --out, found " +
                          ("no input" if source is None else "no --out"))
    result = ingest(source, args.output, _section(args, IngestConfig, "ingest"), workers=args.workers)
    print(f"ingested {result.n_cases} cases ({result.n_failed} left out) -> {result.manifest_path}")


def cmd_plan(args: argparse.Namespace) -> None:
    from medseg.config import PlanConfig
    from medseg.stages.plan import plan

    result = plan(args.manifest, args.output, _section(args, PlanConfig, "plan"))
    p = result.plan
    print(f"plan: {p.dims}D, spacing {p.target_spacing_mm} mm, patch {p.patch_size}, batch {p.batch_size}, "
          f"normalization {p.normalization} -> {result.plan_path}")


def cmd_preprocess(args: argparse.Namespace) -> None:
    from medseg.config import PreprocessConfig
    from medseg.stages.preprocess import preprocess

    result = preprocess(args.manifest, args.plan, args.output, _section(args, PreprocessConfig, "preprocess"))
    print(f"preprocessed {result.n_cases} cases -> {result.index_path.parent}")


def _tags(pairs: Sequence[str]) -> dict[str, str]:
    from medseg.errors import ConfigError

    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--tag: expected KEY=VALUE, found {pair!r}")
        tags[key] = value
    return tags


def cmd_train(args: argparse.Namespace) -> None:
    from medseg.config import TrackingConfig, TrainConfig
    from medseg.stages.train import Tracking, train

    config = _section(args, TrainConfig, "train")
    tracking_config = _section(args, TrackingConfig, "tracking", args.tracking_params or "")
    tags = _tags(args.tag)
    artifacts = {}
    if args.manifest:
        from medseg.manifest import load_manifest

        manifest = load_manifest(args.manifest)[0]
        tags["manifest.digest"] = manifest.digest()
        reviewed = manifest.reviewed_cases()  # where the labels of cases from review folders came from
        tags["data.reviewed_cases"] = str(len(reviewed))
        if reviewed:
            artifacts[REVIEWED_CASES_ARTIFACT] = reviewed
    tracking = Tracking(
        uri=None if args.no_tracking else _tracking_uri(args), config=tracking_config,
        artifact_root=args.artifact_root, tags=tags, artifacts=artifacts,
    )
    from medseg.tracking import configure_client
    from medseg.walltime import job_stop_request

    configure_client(tracking.uri, os.environ)
    result = train(
        args.preprocessed, args.plan, args.splits, args.output, config,
        fold=args.fold, device=args.device, resume="auto" if args.resume_if_present else args.resume,
        stop_after_epoch=args.stop_after_epoch, tracking=tracking,
        stop=job_stop_request(os.environ, config.stop_before_limit_s),
    )
    print(f"fold {args.fold}: best validation Dice {result.best_dice:.4f} at epoch {result.best_epoch}; "
          f"model {result.model_uri}")


def cmd_predict(args: argparse.Namespace) -> None:
    from medseg.config import PredictConfig
    from medseg.errors import ConfigError
    from medseg.plans import load_splits
    from medseg.stages.predict import predict

    uri = _tracking_uri(args)
    models = list(args.model)
    for info in args.model_info:
        from medseg.io import read_json

        models.append(read_json(info)["model_uri"])
    if not models:
        from medseg.tracking import latest_model_version

        models = [latest_model_version(uri)]
        log.info("no --model given: using %s", models[0])
    case_ids = None
    if args.cases:
        case_ids = [c for c in args.cases.split(",") if c]
    if args.splits is not None:
        case_ids = load_splits(args.splits, args.fold)["val"]
    config = _section(args, PredictConfig, "predict")
    if args.postprocessing is not None:
        from medseg.postprocess import read_decision

        given = config.model_dump(include=config.model_fields_set)  # what is not given may come from the model
        config = PredictConfig.model_validate({**given, "largest_component": read_decision(args.postprocessing)})
        log.info("keeping the largest component of labels %s (%s)", list(config.largest_component), args.postprocessing)
    shard = None
    if args.shard:
        try:
            k, n = (int(v) for v in args.shard.split("/"))
        except ValueError:
            raise ConfigError(f"--shard: expected K/N such as 0/4, found {args.shard!r}") from None
        shard = (k, n)
        if args.overwrite:
            raise ConfigError("--shard: expected --replace-others, found --overwrite (each shard would remove the "
                              "others' finished cases)")
    result = predict(args.input, args.output, models, config, case_ids=case_ids, device=args.device,
                     tracking_uri=uri, overwrite=args.overwrite, replace_others=args.replace_others, shard=shard)
    done_before = f", {len(result.skipped)} of them by an earlier run" if result.skipped else ""
    print(f"{len(result.written)} masks in {result.out_dir}{done_before} ({len(result.failed)} failed)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from medseg.config import EvaluateConfig
    from medseg.stages.evaluate import evaluate, log_to_mlflow, record_validated

    result = evaluate(args.predictions, args.output, _section(args, EvaluateConfig, "evaluate"),
                      manifest_path=args.manifest, labels_dir=args.labels)
    if args.model_info:
        runs = log_to_mlflow(result, _tracking_uri(args), args.model_info)
        log.info("logged the evaluation to MLflow run(s) %s", ", ".join(runs))
        for path in record_validated(result, args.predictions, args.model_info, _tracking_uri(args)):
            log.info("the validated prediction settings -> %s", path)
    dice = result.summary["mean_dice"]
    print(f"evaluated {result.n_cases} cases: mean Dice {dice:.4f} -> {result.out_dir}")


def cmd_review(args: argparse.Namespace) -> None:
    from medseg.config import ReviewConfig
    from medseg.errors import ConfigError

    config = _section(args, ReviewConfig, "review")
    if (args.predictions or args.serve or args.log_mlflow) and args.output is None:
        raise ConfigError("review: expected --output, the review folder, found none")
    if args.predictions:
        from medseg.stages.review import INDEX, review

        result = review(args.predictions, args.output, config, scans=args.scans, manifest=args.manifest,
                        evaluation=args.evaluation)
        s = result.summary
        print(f"review of {s['n_cases']} cases ({s['n_flagged']} flagged, {s['n_problems']} with problems) -> "
              f"{result.out_dir / INDEX}")
    elif not (args.serve or args.log_mlflow or args.add_reviewer):
        raise ConfigError("review: expected --predictions (build the review folder), --serve (serve a built one), "
                          "--add-reviewer or --log-mlflow, found none of them")
    if args.add_reviewer:
        from medseg.review import tokens

        if args.tokens is None:
            raise ConfigError("review --add-reviewer: expected --tokens FILE, the file to add the reviewer to")
        token = tokens.add(args.tokens, args.add_reviewer)
        print(f"reviewer {args.add_reviewer} added to {args.tokens}; their token (open the review with "
              f"?token=<it> once): {token}")
    if args.log_mlflow:
        from medseg.stages.review import log_to_mlflow

        logged = log_to_mlflow(args.output, _tracking_uri(args))
        print(f"verdicts logged to {len(logged)} registered model version(s): {', '.join(logged) or 'none'}")
    if args.serve:
        from medseg.review import tokens
        from medseg.review.server import address, make_server, serve

        reviewers = tokens.load(args.tokens) if args.tokens is not None else None
        try:
            server = make_server(args.output, config, host=args.host, port=args.port, reviewer=args.reviewer,
                                 tokens=reviewers, tracking_uri=args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        except OSError as err:
            raise ConfigError(f"review: could not listen on {args.host}:{args.port}: {err}") from None
        print(f"review at {address(server)} (Ctrl-C stops)", flush=True)
        serve(server)


def cmd_select(args: argparse.Namespace) -> None:
    from medseg.errors import ConfigError
    from medseg.stages.select import select

    candidates: dict[str, Path] = {}
    for item in args.candidate:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"select: expected --candidate NAME=RESULTS_FOLDER, found {item!r}")
        if name in candidates:
            raise ConfigError(f"select: candidate name '{name}' given twice; expected distinct names")
        candidates[name] = Path(folder)
    result = select(candidates, args.output)
    scores = ", ".join(f"{n} {d:.4f}" for n, d in result.scores.items())
    print(f"chose {result.chosen} (mean Dice {scores}) -> {result.path}")


def cmd_schema(args: argparse.Namespace) -> None:
    import json

    from medseg.config import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)


def cmd_fetch_data(args: argparse.Namespace) -> None:
    from medseg.datasets import fetch_msd

    print(fetch_msd(args.task, args.output))


def cmd_report(args: argparse.Namespace) -> None:
    from medseg.report import report

    print(report(args.results, _tracking_uri(args)))


def cmd_slurm_local(args: argparse.Namespace) -> None:
    from medseg.services import slurm

    if args.action == "start":
        cluster = slurm.start(args.dir)
        print(f"SLURM on 127.0.0.1: node {cluster.node} ({cluster.cpus} CPUs, {cluster.memory_mb} MB), partition "
              f"{cluster.partition}; stop it with: medseg slurm-local stop --dir {args.dir}")
    else:
        slurm.stop(args.dir)
        print(f"SLURM of {args.dir} stopped")


def cmd_tracking_server(args: argparse.Namespace) -> None:
    from medseg.services import tracking_server

    if args.action == "start":
        server = tracking_server.start(args.dir, port=args.port, workers=args.workers)
        print(f"MLflow server: {server.uri} (PostgreSQL on 127.0.0.1:{server.pg_port}, artifacts in "
              f"{server.folder / 'artifacts'}); use it with: export MLFLOW_TRACKING_URI={server.uri}, or "
              f"--config tracking_uri={server.uri}; stop it with: medseg tracking-server stop --dir {args.dir}")
    else:
        tracking_server.stop(args.dir)
        print(f"tracking server of {args.dir} stopped (its data stay there)")


def cmd_slurm_check(args: argparse.Namespace) -> None:
    from medseg import slurm_check as check
    from medseg.errors import ConfigError

    profile = check.load_profile(args.profile)
    parts = check.partitions(check.read_sinfo())
    reqs = check.requests(profile, args.set_resources, args.set_threads)
    for r in reqs:
        print(f"{r.rule:22s} {r.cpus:3d} CPUs {r.memory_mb:7d} MB {r.gpus} GPUs "
              f"{'-' if r.runtime_min is None else f'{r.runtime_min:.0f} min':>9s}  partition {r.partition or '(default)'}")
    found = check.problems(reqs, parts, args.profile)
    if found:
        raise ConfigError(f"{len(found)} request(s) that no node can hold:\n" + "\n".join(found))
    print("every rule fits a node of its partition")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], None], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    p = add("ingest", cmd_ingest, "raw cases (MSD/nnU-Net folder, cases.tsv, NIfTI folder, any DICOM folder) "
            "to NIfTI, sidecars and a manifest")
    p.add_argument("root", type=Path, nargs="?", help="the input (same as --input)")
    p.add_argument("--input", type=Path)
    p.add_argument("--output", "--out", dest="output", type=Path)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="worker processes for a large DICOM tree (default: CPU count, at most 8)")
    _config_args(p)

    p = add("plan", cmd_plan, "dataset fingerprint and plan (spacing, patch, batch, normalization, folds)")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    _config_args(p)

    p = add("preprocess", cmd_preprocess, "reorient, crop, resample, normalize and cache the cases")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    _config_args(p)

    p = add("train", cmd_train, "train one fold, tracked in MLflow, and register the model")
    p.add_argument("--preprocessed", type=Path, required=True)
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--splits", type=Path, required=True)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--manifest", type=Path, help="the ingest manifest (its digest becomes a run tag)")
    p.add_argument("--resume", action="store_true", help="continue from <output>/last.pt")
    p.add_argument("--resume-if-present", action="store_true",
                   help="continue from <output>/last.pt when it exists and was written with the same plan, network "
                   "and train config, else start afresh (the workflow's rule: a retried job resumes)")
    p.add_argument("--stop-after-epoch", type=int, metavar="N",
                   help="end this run after epoch N (the schedule still spans all epochs); continue with --resume")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else data/results/mlflow.db)")
    p.add_argument("--tracking-params", metavar="JSON", help="the tracking section as JSON")
    p.add_argument("--artifact-root", type=Path, help="artifact folder for a new MLflow experiment")
    p.add_argument("--no-tracking", action="store_true", help="train without MLflow")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="extra run tag (repeatable)")
    _config_args(p)

    p = add("predict", cmd_predict, "masks for scans, in each scan's own geometry")
    p.add_argument("--input", type=Path, required=True, help="a folder of scans (NIfTI, DICOM series, MSD) or a manifest")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--model", action="append", default=[], metavar="URI",
                   help="models:/<name>/<version|@alias>, runs:/<id>/model or a checkpoint; repeat for an "
                        "ensemble (default: the latest registered model version)")
    p.add_argument("--model-info", type=Path, action="append", default=[], help="a model.json written by train")
    p.add_argument("--cases", help="comma-separated case ids to predict (default: all)")
    p.add_argument("--splits", type=Path, help="with --fold: predict that fold's validation cases")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--tracking-uri")
    p.add_argument("--overwrite", action="store_true",
                   help="predict every case again into a folder that holds other models' or settings' predictions "
                        "(by default a folder of the same models and settings is resumed, others refused)")
    p.add_argument("--replace-others", action="store_true",
                   help="start afresh a folder that holds other models' or settings' predictions, but resume one of "
                        "the same models and settings (what a workflow wants)")
    p.add_argument("--shard", metavar="K/N",
                   help="predict only every N-th case by case id, from the K-th (0-based): N processes (one per GPU, "
                        "or cluster jobs) share the cases and the output folder")
    p.add_argument("--postprocessing", type=Path, metavar="JSON",
                   help="evaluate's postprocessing.json: keep only the largest connected component of the labels "
                        "where cross-validation showed it helps (sets predict.largest_component; a model that "
                        "evaluate scored already carries it)")
    _config_args(p)

    p = add("evaluate", cmd_evaluate, "Dice, IoU, HD95, surface distance and surface Dice per case and class")
    p.add_argument("--predictions", type=Path, nargs="+", required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--manifest", type=Path, help="references: the labels of an ingest manifest")
    p.add_argument("--labels", type=Path, help="references: a folder of label files named like the masks")
    p.add_argument("--model-info", type=Path, nargs="*", default=[],
                   help="model.json files of the trainings to log the evaluation to (MLflow)")
    p.add_argument("--tracking-uri")
    _config_args(p)

    p = add("review", cmd_review, "queue the masks for a person to check, flagged cases first; pages with the "
            "mask over the scan and a verdict form (--serve)")
    p.add_argument("--predictions", type=Path, nargs="+", help="prediction folders (medseg predict's output) to "
                   "build the review folder from")
    p.add_argument("--output", type=Path, help="the review folder")
    p.add_argument("--evaluation", type=Path, metavar="CSV", help="evaluate's metrics.csv: Dice per case and class")
    p.add_argument("--manifest", type=Path, help="an ingest manifest whose labels are drawn as reference outlines")
    p.add_argument("--scans", type=Path, help="the predict input, for prediction folders that do not record their "
                   "scans")
    p.add_argument("--serve", action="store_true", help="serve the review folder (after building it, with "
                   "--predictions) until Ctrl-C")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free one)")
    p.add_argument("--reviewer", default=os.environ.get("USER", ""), help="without --tokens: the name recorded "
                   "with verdicts (default: $USER)")
    p.add_argument("--tokens", type=Path, default=os.environ.get("MEDSEG_REVIEW_TOKENS") or None,
                   help="reviewers' tokens ('<name> <token>' per line; default $MEDSEG_REVIEW_TOKENS): every "
                   "request needs one, and verdicts record its name; needed to serve on another address than "
                   "127.0.0.1")
    p.add_argument("--add-reviewer", metavar="NAME", help="add a reviewer with a new random token to --tokens "
                   "and print the token")
    p.add_argument("--log-mlflow", action="store_true", help="tag each registered model version whose masks the "
                   "review holds with the counts of its verdicts (review.accept, review.fix, ...) and log "
                   "verdicts.csv to its run")
    p.add_argument("--tracking-uri")
    _config_args(p)

    p = add("select", cmd_select, "choose the best of several finished runs (2D against 3D, networks) by "
            "cross-validated Dice")
    p.add_argument("--candidate", action="append", default=[], required=True, metavar="NAME=RESULTS",
                   help="a finished run's results folder (repeat: at least 2)")
    p.add_argument("--output", type=Path, required=True, help="the selection.json to write")

    p = add("schema", cmd_schema, "print the JSON schema of the workflow config")
    p.add_argument("--output", type=Path)

    p = add("fetch-data", cmd_fetch_data, "download and verify a Medical Segmentation Decathlon task")
    p.add_argument("--task", default="Task04_Hippocampus")
    p.add_argument("--output", type=Path, default=Path("data/raw"))

    p = add("slurm-local", cmd_slurm_local, "start or stop a one-node SLURM cluster on 127.0.0.1 (root; Debian's "
            "slurm-wlm and munge) to try the SLURM profile on one machine")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--dir", type=Path, default=Path("data/services/slurm"), help="state, spool and logs")

    p = add("tracking-server", cmd_tracking_server, "start or stop a team's MLflow server on 127.0.0.1 with a "
            "PostgreSQL backend store and an artifact folder (Debian's postgresql)")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--dir", type=Path, default=Path("data/services/tracking"),
                   help="the database, the artifacts and the logs (kept across restarts)")
    p.add_argument("--port", type=int, help="the MLflow server's port (default: the last one, else a free one)")
    p.add_argument("--workers", type=int, default=2, help="server worker processes")

    p = add("slurm-check", cmd_slurm_check, "check a Snakemake SLURM profile's CPUs, memory, time and GPUs per "
            "rule against the cluster's nodes (sinfo), naming the setting to change")
    p.add_argument("--profile", type=Path, default=Path("configs/profiles/slurm"))
    p.add_argument("--set-resources", nargs="*", default=[], metavar="RULE:NAME=VALUE",
                   help="the overrides you pass to snakemake")
    p.add_argument("--set-threads", nargs="*", default=[], metavar="RULE=N")

    p = add("report", cmd_report, "summarize a finished workflow run")
    p.add_argument("--results", type=Path, default=Path("data/results"))
    p.add_argument("--tracking-uri")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # highdicom's INFO lines name the source instances' SOP Instance UIDs, which tie a log to the patient's record
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
    try:
        args.func(args)
    except MedsegError as err:
        print(f"medseg {args.command}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except OSError as err:
        from medseg.io import NO_SPACE

        if err.errno not in NO_SPACE:
            raise
        # medseg.io's atomic writes name the file and leave no part of it; the files written before stay whole.
        print(f"medseg {args.command}: error: cannot write {err.filename or 'a file'}: {err.strerror}: free some space "
              "and run the command again", file=sys.stderr)
        return 2
    except Exception as err:
        from medseg.tracking import unreachable

        if not unreachable(err):
            raise
        print(f"medseg {args.command}: error: the MLflow tracking server did not answer: {str(err).splitlines()[0]}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
