"""Training plumbing shared by the pretraining and adaptation stages."""
