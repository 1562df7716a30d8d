# Shared by the rule files: the validated config with every default filled in.
from medseg.tracking import default_tracking_uri
from medseg.workflow import full_config, section_arg

CFG = full_config(config)
RESULTS = CFG["results"].rstrip("/")
DATASET = CFG["dataset"]
FOLDS = CFG["train"]["folds"]
TRACKING_URI = CFG["tracking_uri"] or default_tracking_uri(RESULTS)
# Several training processes (DistributedDataParallel) run under torchrun, one GPU each.
TRAIN_PROCESSES = CFG["train"]["processes"]
TRAIN_GPUS = TRAIN_PROCESSES if TRAIN_PROCESSES > 1 else 0
TRAIN_LAUNCHER = (
    f"torchrun --standalone --nproc_per_node={TRAIN_PROCESSES} -m medseg.cli" if TRAIN_PROCESSES > 1 else "medseg"
)
