"""Synthetic abdominal CT phantoms with organ labels, written as NIfTI data sets with data lists.

The default data when no real CT is given: seeded, fast (about a second per volume at 2-3 mm) and varied
(body and organ size, position and shape, smooth deformations, HU noise, anisotropic spacing, RAS/LPS/LAS
and oblique affines). ``fsseg-phantom --out DIR`` writes partially labelled *source* data sets for
pretraining, each annotating a different subset of organs, and a fully labelled *target* data set with
train/test splits for k-shot adaptation. No source annotates the gallbladder: it is the demo's novel organ.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from fsseg.data.io import save_nifti
from fsseg.errors import DataError
from fsseg.files import atomic_path, staged_writes
from fsseg.outputs import prepare_output_dir

# World frame: RAS mm centred on the body; +x patient right, +y anterior, +z superior.
FIELD_OF_VIEW_MM = ((-185.0, 185.0), (-145.0, 145.0), (-110.0, 120.0))
AIR_HU = -1000.0
DESCRIPTION = "fsseg phantom data set"  # begins every list's description: how a rerun knows the lists it may replace


@dataclass(frozen=True)
class Organ:
    """An ellipsoid organ: centre and radii in mm, HU mean, and a tilt about z in degrees."""

    name: str
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    hu: float
    tilt: float = 0.0


# Painted in this order; a later organ overrides an earlier one where they overlap.
ORGANS = (
    Organ("liver", (70.0, 5.0, 55.0), (85.0, 75.0, 60.0), 60.0, tilt=-15.0),
    Organ("spleen", (-85.0, -40.0, 55.0), (30.0, 45.0, 50.0), 48.0, tilt=30.0),
    Organ("kidney_right", (55.0, -55.0, -5.0), (24.0, 26.0, 50.0), 140.0, tilt=20.0),
    Organ("kidney_left", (-55.0, -55.0, 5.0), (24.0, 26.0, 50.0), 140.0, tilt=-20.0),
    Organ("stomach", (-45.0, 35.0, 50.0), (45.0, 35.0, 45.0), 22.0, tilt=-25.0),
    Organ("pancreas", (-10.0, -12.0, 12.0), (62.0, 13.0, 15.0), 45.0, tilt=10.0),
    Organ("gallbladder", (55.0, 45.0, 12.0), (15.0, 16.0, 28.0), 8.0),
    Organ("aorta", (-15.0, -28.0, 0.0), (11.0, 11.0, 400.0), 170.0),
)
STRUCTURES = tuple(organ.name for organ in ORGANS)


@dataclass(frozen=True)
class PhantomDataset:
    """One data set of the phantom collection: its label map (file id -> organ) and its case counts."""

    name: str
    label_map: dict[str, str]
    train: int
    test: int = 0


def default_datasets(source_cases: int = 4, target_train: int = 8, target_test: int = 4) -> list[PhantomDataset]:
    """Three partially labelled source data sets and one fully labelled target data set."""
    return [
        PhantomDataset(
            "phantom_source_a", {"1": "liver", "2": "spleen", "3": "kidney_right", "4": "kidney_left"}, source_cases
        ),
        # One id for both kidneys: exercises the left/right split at the midline.
        PhantomDataset(
            "phantom_source_b", {"1": "liver", "2": "kidney@split", "3": "stomach", "4": "aorta"}, source_cases
        ),
        PhantomDataset(
            "phantom_source_c", {"1": "spleen", "2": "pancreas", "3": "stomach", "4": "aorta"}, source_cases
        ),
        PhantomDataset(
            "phantom_target", {str(i + 1): name for i, name in enumerate(STRUCTURES)}, target_train, target_test
        ),
    ]


def _rotation_z(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def phantom_affine(rng: np.random.Generator, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[int, ...]]:
    """A random grid covering the field of view: RAS, LPS or LAS axes, sometimes oblique (up to 10 degrees)."""
    flips = {"RAS": (1, 1, 1), "LPS": (-1, -1, 1), "LAS": (-1, 1, 1)}[rng.choice(["RAS", "LPS", "LAS"])]
    tilt = rng.uniform(-10.0, 10.0) if rng.random() < 0.3 else 0.0
    direction = _rotation_z(tilt) @ np.diag(flips).astype(float)
    extent = np.array([hi - lo for lo, hi in FIELD_OF_VIEW_MM])
    shape = tuple(int(np.ceil(e / s)) + 1 for e, s in zip(extent, spacing))
    centre = np.array([(lo + hi) / 2 for lo, hi in FIELD_OF_VIEW_MM])
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing, dtype=float)
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine, shape


def _world_grid(affine: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
    i, j, k = (np.arange(n, dtype=np.float32) for n in shape)
    return [
        affine[a, 0] * i[:, None, None]
        + affine[a, 1] * j[None, :, None]
        + affine[a, 2] * k[None, None, :]
        + np.float32(affine[a, 3])
        for a in range(3)
    ]


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """A smooth random displacement (mm): 5^3 random weights on separable Gaussian bumps along each axis."""
    coarse = rng.normal(0.0, amplitude, size=(5, 5, 5)).astype(np.float32)
    field = coarse
    for n in shape:  # contract one coarse axis at a time: (5, 5, 5) -> (5, 5, n0) -> ... -> (n0, n1, n2)
        position = np.linspace(0.0, 4.0, n, dtype=np.float32)[:, None]
        bumps = np.exp(-((position - np.arange(5, dtype=np.float32)) ** 2))
        field = np.tensordot(field, bumps, axes=([0], [1]))
    return field


def generate_volume(
    rng: np.random.Generator, spacing: Sequence[float] = (2.0, 2.0, 2.5)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random phantom.

    Returns:
        ``(image, label, affine)``: int16 HU, uint8 label with ``i + 1`` for ``STRUCTURES[i]``, voxel -> RAS mm.
    """
    affine, shape = phantom_affine(rng, spacing)
    x, y, z = _world_grid(affine, shape)
    x = x + _smooth_field(rng, shape, 6.0)
    y = y + _smooth_field(rng, shape, 6.0)
    z = z + _smooth_field(rng, shape, 6.0)

    body_rx, body_ry = 160.0 * rng.uniform(0.88, 1.08), 115.0 * rng.uniform(0.88, 1.08)
    radial = np.sqrt((x / body_rx) ** 2 + (y / body_ry) ** 2)
    fat_depth, muscle_depth = rng.uniform(0.08, 0.16), 0.07
    image = np.full(shape, AIR_HU, dtype=np.float32)
    image[radial < 1.0] = -100.0  # subcutaneous fat
    image[radial < 1.0 - fat_depth] = 45.0  # abdominal wall muscle
    image[radial < 1.0 - fat_depth - muscle_depth] = -60.0  # visceral fat and bowel
    vertebra = ((x / 20.0) ** 2 + ((y + 62.0) / 18.0) ** 2) < 1.0
    image[vertebra] = 700.0
    image[((x / 15.0) ** 2 + ((y + 62.0) / 13.0) ** 2) < 1.0] = 300.0  # cancellous core
    image[((x / 8.0) ** 2 + ((y + 92.0) / 8.0) ** 2) < 1.0] = 20.0  # spinal canal

    label = np.zeros(shape, dtype=np.uint8)
    hu_shift = rng.normal(0.0, 8.0)
    for index, organ in enumerate(ORGANS):
        centre = np.asarray(organ.centre) + rng.normal(0.0, 6.0, 3)
        radii = np.asarray(organ.radii) * rng.uniform(0.82, 1.18, 3)
        rot = _rotation_z(organ.tilt + rng.normal(0.0, 6.0))
        dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
        u = rot[0, 0] * dx + rot[1, 0] * dy
        v = rot[0, 1] * dx + rot[1, 1] * dy
        inside = (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (dz / radii[2]) ** 2 < 1.0
        inside &= radial < 1.0 - fat_depth - muscle_depth
        label[inside] = index + 1
        image[inside] = organ.hu + hu_shift
    stomach = label == STRUCTURES.index("stomach") + 1
    if stomach.any():  # an air pocket at the front of the stomach
        image[stomach & (y > np.percentile(y[stomach], 80))] = -850.0

    image += rng.normal(0.0, 12.0, size=shape).astype(np.float32)
    image = ndimage.gaussian_filter(image, 0.6)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), label, affine


def relabel(label: np.ndarray, label_map: dict[str, str]) -> np.ndarray:
    """Keep only the organs a data set annotates, with its own ids (``kidney@split`` -> both kidneys)."""
    out = np.zeros_like(label)
    for file_id, name in label_map.items():
        names = ("kidney_right", "kidney_left") if name == "kidney@split" else (name,)
        for organ in names:
            out[label == STRUCTURES.index(organ) + 1] = int(file_id)
    return out


SPACINGS_MM = ((2.0, 2.0, 2.5), (1.5, 1.5, 3.0), (2.5, 2.5, 2.5), (3.0, 3.0, 3.0))


def write_dataset(
    out: Path, dataset: PhantomDataset, seed: int, spacing: Sequence[float] | None = None, progress: bool = True
) -> Path:
    """Generate and write one data set under ``out/<name>/`` and its data list ``out/<name>.json``."""
    cases = []
    splits = ["train"] * dataset.train + ["test"] * dataset.test
    # The data set's name enters the seed so that data sets of one collection differ.
    base = [seed, sum(dataset.name.encode())]
    for i, split in enumerate(tqdm(splits, desc=dataset.name, unit="vol", disable=not progress, file=sys.stderr)):
        rng = np.random.default_rng(base + [i])
        chosen = spacing or SPACINGS_MM[int(rng.integers(len(SPACINGS_MM)))]
        image, label, affine = generate_volume(rng, chosen)
        case_id = f"{dataset.name}_{i:03d}"
        save_nifti(image, affine, out / dataset.name / "images" / f"{case_id}.nii.gz")
        save_nifti(relabel(label, dataset.label_map), affine, out / dataset.name / "labels" / f"{case_id}.nii.gz")
        cases.append(
            {"id": case_id, "image": f"images/{case_id}.nii.gz", "label": f"labels/{case_id}.nii.gz", "split": split}
        )
    datalist = {
        "name": dataset.name,
        "description": f"{DESCRIPTION} (seed {seed}), annotating {', '.join(dataset.label_map.values())}",
        "root": dataset.name,
        "label_map": dataset.label_map,
        "cases": cases,
    }
    list_path = out / f"{dataset.name}.json"
    with atomic_path(list_path) as tmp:
        tmp.write_text(json.dumps(datalist, indent=1) + "\n")
    return list_path


def write_phantoms(
    out: str | Path,
    seed: int = 0,
    sizes: tuple[int, int, int] = (4, 8, 4),
    spacing: Sequence[float] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write :func:`default_datasets` (``sizes``: cases per source data set, target train and test cases) under
    ``out``, all of them or none, and return their data lists. The same ``seed`` gives the same volumes.

    Raises:
        DataError: a data list of that name in ``out`` is not a phantom list (it would be replaced); ``out`` cannot
            be written.
    """
    out = prepare_output_dir(out, "--out")
    datasets = default_datasets(*sizes)
    for dataset in datasets:
        _check_replaceable(out / f"{dataset.name}.json")
    with staged_writes(out) as staging:  # no half-written data set after an error
        for dataset in datasets:
            write_dataset(staging, dataset, seed, spacing, progress)
    return [out / f"{dataset.name}.json" for dataset in datasets]


def _check_replaceable(path: Path) -> None:
    """Refuse a data list at ``path`` that is not a phantom list: the user's own would be replaced."""
    try:
        ours = json.loads(path.read_text())["description"].startswith(DESCRIPTION)
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        ours = False
    if not ours:
        raise DataError(f"{path}: exists and is not a list of fsseg-phantom; choose another --out")
