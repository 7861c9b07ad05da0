"""The adaptation stage: few-shot parameter-efficient fine-tuning to a target structure."""
