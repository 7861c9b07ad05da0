"""fsseg: few-shot parameter-efficient fine-tuning of volumetric CT segmentation foundation models."""

__version__ = "0.1.0"
