"""Pictures people can look at: slice overlays, Dice-vs-shots curves and Dice box plots (headless PNGs).

matplotlib is an optional extra (``pip install -e .[viz]``); without it the commands say how to get it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import cycle
from pathlib import Path

import nibabel as nib
import numpy as np

from fsseg.errors import FssegError
from fsseg.files import atomic_path

# One convention in every picture: ground truth in greens, predictions in reds and other warm colours (one a
# structure), slices shown as radiologists read them (the patient's right on the viewer's left, anterior on the
# left of a sagittal slice), with the sides marked.
TRUTH_COLOURS = ("#2ca02c", "#98df8a", "#17becf", "#1f77b4")
PREDICTION_COLOURS = ("#d62728", "#ff7f0e", "#e377c2", "#bcbd22", "#9467bd", "#8c564b")
DISPLAY_WINDOW_HU = (-175.0, 250.0)


def pyplot():
    """matplotlib's pyplot on the headless Agg backend, or a one-line error saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise FssegError("pictures need matplotlib: pip install -e .[viz] (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
    image = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array), affine))
    return np.asanyarray(image.dataobj), tuple(float(z) for z in image.header.get_zooms()[:3])


# The patient-side letters at the edges of each view.
SIDE_MARKER = {"color": "yellow", "fontsize": 12, "fontweight": "bold", "ha": "center", "va": "center"}


def overlay_png(
    path: str | Path,
    image: np.ndarray,
    affine: np.ndarray,
    prediction: Mapping[str, np.ndarray],
    title: str,
    truth: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Axial, coronal and sagittal slices through the structure, each mask drawn as a contour, in radiological
    orientation with side markers; ground truth in greens, predictions in reds.

    Args:
        image: the scan (HU) on its own grid; ``affine`` its voxel-to-world matrix.
        prediction: structure -> predicted binary mask on the same grid; ``truth`` the same for the ground truth.
            The first non-empty mask (ground truth first) chooses the slices.
    """
    plt = pyplot()
    volume, zooms = _canonical(image.astype(np.float32), affine)  # RAS: +x toward the patient's right
    contours = [
        (f"ground truth: {name}", colour, mask)
        for (name, mask), colour in zip((truth or {}).items(), cycle(TRUTH_COLOURS))
    ]
    contours += [
        (f"prediction: {name}", colour, mask)
        for (name, mask), colour in zip(prediction.items(), cycle(PREDICTION_COLOURS))
    ]
    contours = [(label, colour, _canonical(mask.astype(np.uint8), affine)[0] > 0) for label, colour, mask in contours]
    anchor = next((mask for *_, mask in contours if mask.any()), None)
    centre = np.argwhere(anchor).mean(0).astype(int) if anchor is not None else np.array(volume.shape) // 2
    # (name, cut, aspect, marker on the viewer's left, on the right); the horizontal axis is flipped in each
    views = [
        ("axial", lambda a: a[:, :, centre[2]], zooms[1] / zooms[0], "R", "L"),
        ("coronal", lambda a: a[:, centre[1], :], zooms[2] / zooms[0], "R", "L"),
        ("sagittal", lambda a: a[centre[0], :, :], zooms[2] / zooms[1], "A", "P"),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    for axis, (name, cut, aspect, left, right) in zip(axes, views):
        axis.imshow(np.clip(cut(volume), *DISPLAY_WINDOW_HU).T, cmap="gray", origin="lower", aspect=aspect)
        for _, colour, mask in contours:
            section = cut(mask).T.astype(float)
            if section.any():
                axis.contour(section, levels=[0.5], colors=[colour], linewidths=1.2)
        axis.invert_xaxis()
        for x, marker in ((0.03, left), (0.97, right)):
            axis.text(x, 0.5, marker, transform=axis.transAxes, **SIDE_MARKER)
        axis.set_title(name)
        axis.axis("off")
    handles = [plt.Line2D([], [], color=colour, label=label) for label, colour, _ in contours]
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3), frameon=False, fontsize="small")
    figure.suptitle(title)
    return _save(figure, path)


def dice_vs_shots_png(path: str | Path, curves: Mapping[str, Mapping[int, tuple[float, float]]], title: str) -> Path:
    """One line per method: mean Dice (± std band over seeds) against the number of shots K."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4.2))
    for method, points in curves.items():
        shots = sorted(points)
        mean = np.array([points[k][0] for k in shots])
        std = np.array([points[k][1] for k in shots])
        axis.plot(shots, mean, marker="o", label=method)
        axis.fill_between(shots, mean - std, mean + std, alpha=0.2)
    axis.set_xlabel("shots K")
    axis.set_ylabel("Dice")
    axis.set_ylim(0, 1)
    axis.set_xticks(sorted({k for points in curves.values() for k in points}))
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title(title)
    return _save(figure, path)


def dice_boxplot_png(path: str | Path, dice: Mapping[str, Sequence[float]], title: str) -> Path:
    """A box of per-case Dice for each structure."""
    plt = pyplot()
    names = list(dice)
    figure, axis = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 4.2))
    axis.boxplot([list(dice[n]) for n in names])
    axis.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    axis.set_ylabel("Dice")
    axis.set_ylim(0, 1)
    axis.grid(axis="y", alpha=0.3)
    axis.set_title(title)
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_path(path) as tmp:  # a tight box keeps a wide legend whole
        figure.savefig(tmp, dpi=80, format="png", bbox_inches="tight")
    plt.close(figure)
    return Path(path)
