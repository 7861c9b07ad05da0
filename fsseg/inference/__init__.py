"""Inference: sliding-window prediction in model space, probabilities resampled back onto the input grid."""

from fsseg.inference.predictor import InferenceSettings, Prediction, Predictor

__all__ = ["InferenceSettings", "Prediction", "Predictor"]
