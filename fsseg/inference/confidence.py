"""How far to trust each predicted structure: a confidence in [0, 1] and the facts behind it.

Three facts a reader can check, each turned into a factor in [0, 1], the confidence being their product:

* **size**: the predicted volume against the organ-size prior of the supports (the prior of the transductive
  constraint, recorded in the adapter file): min(V, S) / max(V, S); 1 when no prior is known (a checkpoint's own
  head);
* **sharpness**: one minus the mean binary entropy (bits) of the sigmoid probabilities on the mask's border (the
  voxels one step inside and outside it, in model space), where an unsure model spreads its probability;
* **coherence**: the share of the mask in its largest 26-connected component (an organ is one piece; scattered
  islands mark a confused prediction).

An empty mask has confidence 0. The factors are facts of the prediction alone: whether the confidence ranks
predictions by their Dice is measured (``bench/confidence_real.py``), not assumed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage

CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
# Above this many voxels in a mask's bounding box, its facts are read off every second voxel along each axis: an
# eighth of the cost (a whole-body template's 117 structures on a full-size CT) for the same means and pieces.
FULL_RESOLUTION_VOXELS = 2**20
# The key under which adapter files and predictions.json keep the organ-size prior (ml) of each structure.
PRIORS = "size_prior_ml"


@dataclass(frozen=True)
class Uncertainty:
    """What the model-space probabilities of one structure say: the mean entropy (bits) inside the mask and on its
    border, its connected components and the share of its largest one."""

    entropy_inside: float
    entropy_border: float
    components: int
    largest_share: float


@dataclass(frozen=True)
class Confidence:
    """One structure's confidence in [0, 1], its factors and the facts behind them."""

    confidence: float
    size: float
    sharpness: float
    coherence: float
    volume_ml: float
    prior_ml: float | None
    entropy_inside: float
    entropy_border: float
    components: int

    def to_dict(self) -> dict:
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in asdict(self).items()}


def binary_entropy(probability: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of a Bernoulli variable with ``probability`` (0 at 0 and 1, 1 at 0.5)."""
    p = probability.float().clamp(1e-6, 1 - 1e-6)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


def structure_uncertainty(probability: torch.Tensor, threshold: float = 0.5) -> Uncertainty:
    """:class:`Uncertainty` of one structure's model-space probabilities (X, Y, Z), computed inside the mask's
    bounding box (a voxel wider), so that a small organ costs little on a large scan."""
    mask = (probability > threshold).cpu().numpy()
    found = ndimage.find_objects(mask.astype(np.uint8))
    if not found or found[0] is None:
        return Uncertainty(0.0, 0.0, 0, 0.0)
    step = 2 if np.prod([s.stop - s.start for s in found[0]]) > FULL_RESOLUTION_VOXELS else 1
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1, step) for s in found[0])
    inside = mask[box]
    if not inside.any():  # a sparse mask whose voxels every second voxel misses: read it whole
        box = tuple(slice(b.start, b.stop) for b in box)
        inside = mask[box]
    entropy = binary_entropy(probability[box].cpu()).numpy()
    border = ndimage.binary_dilation(inside, CONNECTIVITY) & ~ndimage.binary_erosion(inside, CONNECTIVITY)
    labels, count = ndimage.label(inside, structure=CONNECTIVITY)
    largest = int(np.bincount(labels.ravel())[1:].max())
    return Uncertainty(
        entropy_inside=float(entropy[inside].mean()),
        entropy_border=float(entropy[border].mean()),
        components=int(count),
        largest_share=largest / int(inside.sum()),
    )


def confidence_of(uncertainty: Uncertainty, volume_ml: float, prior_ml: float | None) -> Confidence:
    """Combine the facts of one predicted structure into its :class:`Confidence`."""
    if volume_ml <= 0 or uncertainty.components == 0:
        size = 0.0
    elif prior_ml:
        size = min(volume_ml, prior_ml) / max(volume_ml, prior_ml)
    else:
        size = 1.0
    sharpness = 1.0 - uncertainty.entropy_border
    coherence = uncertainty.largest_share
    score = size * sharpness * coherence
    return Confidence(
        confidence=score if math.isfinite(score) else 0.0,
        size=size,
        sharpness=sharpness,
        coherence=coherence,
        volume_ml=volume_ml,
        prior_ml=prior_ml,
        entropy_inside=uncertainty.entropy_inside,
        entropy_border=uncertainty.entropy_border,
        components=uncertainty.components,
    )


def structure_confidences(
    structures: Sequence[str],
    uncertainty: Sequence[Uncertainty],
    volumes_ml: Mapping[str, float],
    priors_ml: Mapping[str, float],
) -> dict[str, Confidence]:
    """Each structure's :class:`Confidence` from its uncertainty, its predicted volume and, where the supports gave
    one, its organ-size prior (both in ml)."""
    return {name: confidence_of(u, volumes_ml[name], priors_ml.get(name)) for name, u in zip(structures, uncertainty)}
