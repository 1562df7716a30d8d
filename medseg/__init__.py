"""medseg: a medical image segmentation pipeline built on MONAI, MLflow and Snakemake."""

__version__ = "0.1.0"
