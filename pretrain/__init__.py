"""The pretraining stage: partial-label supervised training of a foundation model."""
