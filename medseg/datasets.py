"""Public datasets the demo can download: the Medical Segmentation Decathlon (MSD) tasks.

Downloads go through MONAI's ``download_and_extract``, which checks the archive's MD5.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medseg.errors import DownloadError

log = logging.getLogger(__name__)

# The archives and checksums MONAI's DecathlonDataset uses.
MSD_TASKS = {
    "Task04_Hippocampus": (
        "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task04_Hippocampus.tar",
        "9d24dba78a72977dbd1d2e110310f31b",
    ),
}


def fetch_msd(task: str, out_dir: Path) -> Path:
    """Return ``out_dir/<task>``, downloading and verifying the archive first if it is not there."""
    if task not in MSD_TASKS:
        raise DownloadError(f"unknown MSD task '{task}': expected one of {sorted(MSD_TASKS)}")
    out_dir = Path(out_dir)
    target = out_dir / task
    if (target / "dataset.json").exists():
        log.info("%s is already at %s", task, target)
        return target
    url, md5 = MSD_TASKS[task]
    from monai.apps import download_and_extract

    archive = out_dir / f"{task}.tar"
    log.info("downloading %s (checksum %s) to %s", url, md5, archive)
    try:
        download_and_extract(url=url, filepath=archive, output_dir=out_dir, hash_val=md5, hash_type="md5")
    except Exception as err:  # network errors come in many types
        raise DownloadError(
            f"could not download {task} from {url}: {type(err).__name__}: {err}. Without network access, pass a "
            f"local copy instead: make demo DATA=/path/to/{task}"
        ) from None
    if not (target / "dataset.json").exists():
        raise DownloadError(f"{archive}: expected {task}/dataset.json inside the archive, found none")
    archive.unlink(missing_ok=True)
    return target
