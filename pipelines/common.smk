# Shared by the rule files: the validated config with every default filled in.
import re

from medseg.tracking import default_tracking_uri
from medseg.workflow import (
    configuration_configs,
    configuration_input,
    configuration_section,
    full_config,
    new_scans_predict_arg,
    own_preprocessing,
    reviewed_inputs,
    section_arg,
    train_gpus,
    train_launcher,
)

CFG = full_config(config)
RESULTS = CFG["results"].rstrip("/")
DATASET = CFG["dataset"]
FOLDS = CFG["train"]["folds"]
TRACKING_URI = CFG["tracking_uri"] or default_tracking_uri(RESULTS)
# Several training processes (DistributedDataParallel) run under torchrun, one GPU each.
TRAIN_GPUS = train_gpus(CFG)
TRAIN_LAUNCHER = train_launcher(CFG)
# select.configurations: other configurations this workflow trains and compares with this run, each
# under <results>/configurations/<name> (its whole config here), on this run's folds and split.
CONFIGURATIONS = configuration_configs(CFG)
OWN_PREPROCESSING = {name: own_preprocessing(CFG, name) for name in CONFIGURATIONS}
CONFIGURATION = f"{RESULTS}/configurations/{{configuration}}"


wildcard_constraints:
    fold=r"\d+",
    shard=r"\d+",
    configuration="|".join(map(re.escape, CONFIGURATIONS)) or "(?!x)x",

