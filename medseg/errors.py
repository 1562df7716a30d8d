"""The one exception family of medseg.

Every message says what was expected, what was found, and where (which file).
"""

from __future__ import annotations


class MedsegError(Exception):
    """Base class of every error medseg raises on purpose."""


class ConfigError(MedsegError):
    """A configuration file or value is invalid."""


class DataError(MedsegError):
    """An input file is missing, unreadable or inconsistent."""


class DicomSeriesError(DataError):
    """A DICOM series cannot be turned into a volume."""


class DicomLabelError(DataError):
    """A DICOM label object (SEG, RTSTRUCT) cannot be mapped onto its image series."""


class GeometryMismatchError(DataError):
    """An image and its label (or two channels) do not share one voxel grid."""


class LabelValueError(DataError):
    """A label holds values that the dataset does not declare."""


class DownloadError(MedsegError):
    """A dataset could not be downloaded or failed its checksum."""


class ModelError(MedsegError):
    """A model cannot be found, loaded or used."""


class ServiceError(MedsegError):
    """A local service (SLURM, PostgreSQL, an MLflow server) cannot be started, reached or stopped."""


class TrackingError(MedsegError):
    """The MLflow tracking store or server did not answer within the wait that medseg allows."""


class TrainingInterrupted(MedsegError):
    """Training stopped early, with its checkpoint written, before a wall-time limit: run it again to resume."""

    exit_code = 75  # EX_TEMPFAIL: try again
