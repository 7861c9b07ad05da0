"""Shared fixtures: the sample CT that ships with fsseg (sample_data/ct) and small synthetic NIfTI files."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CT = REPO / "sample_data" / "ct"
TOTALSEG_LIST = REPO / "data_lists" / "examples" / "sample_ct_totalseg.json"
LITS_LIST = REPO / "data_lists" / "examples" / "sample_ct_lits.json"


def pytest_configure(config) -> None:
    """Under pytest-xdist the workers split the cores: torch in each worker, and in the commands a worker starts,
    keeps to its share (one thread with ``make test``'s one worker a core), so that the workers' threads never
    outnumber the cores."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        # sched_getaffinity (the cores this process may use) is Linux-only; elsewhere all the machine's cores
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list) -> None:
    """The tests marked ``long`` (minutes each) run first, so that under pytest-xdist no worker is left with one of
    them after the other has run out of tests."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(scope="session")
def sample_ct() -> Path:
    """The sample CT folder of the checkout (read it, never write into it)."""
    return SAMPLE_CT


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Save ``array`` as NIfTI (identity affine by default) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def ct_like(shape=(24, 20, 16), seed: int = 0) -> np.ndarray:
    """A small int16 volume with air around a soft-tissue block, so it looks like CT in HU."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000, dtype=np.int16)
    image[4:-4, 4:-4, 2:-2] = 40 + rng.integers(-20, 20, size=(shape[0] - 8, shape[1] - 8, shape[2] - 4))
    return image


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Small phantom data sets (4 mm voxels): three partially labelled sources and a target with splits."""
    from fsseg.data import phantom

    out = tmp_path_factory.mktemp("phantoms")
    for dataset in phantom.default_datasets(source_cases=2, target_train=3, target_test=2):
        phantom.write_dataset(out, dataset, seed=0, spacing=(4.0, 4.0, 4.0), progress=False)
    return out


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """One fsseg-adapt ``cache_dir`` for the tests whose property is not the cache itself: each scan's frozen
    features are then computed once per session instead of once per test."""
    return tmp_path_factory.mktemp("feature_cache")


def source_lists(phantom_dir: Path) -> list[str]:
    return [str(phantom_dir / f"phantom_source_{s}.json") for s in "abc"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny UNet checkpoint (4 mm, 32^3 roi) in the fseft29 template."""
    import torch

    from fsseg.checkpoint import save_checkpoint
    from fsseg.models import create_model
    from fsseg.preprocessing import Preprocessing
    from fsseg.templates import load_template

    template = load_template()
    torch.manual_seed(0)
    model = create_model("unet_tiny", num_classes=len(template))
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
    return save_checkpoint(
        path,
        {
            "arch": model.arch,
            "template": template.to_dict(),
            "preprocessing": Preprocessing(spacing=(4.0, 4.0, 4.0), roi=(32, 32, 32)).to_dict(),
            "state_dict": model.state_dict(),
        },
    )


def write_method_configs(folder: Path, epochs: int = 8, **training) -> Path:
    """Short per-method training settings for tests."""
    import yaml

    from fsseg.adapters import list_methods

    folder.mkdir(parents=True, exist_ok=True)
    for method in list_methods():
        # two steps an epoch: a K=1 epoch revisits its support, a K=3 round runs on into the next epoch
        settings = {
            "epochs": epochs,
            "steps_per_epoch": 2,
            "warmup_epochs": 1,
            "crops_per_volume": 2,
            "lr": 1e-2,
            **training,
        }
        (folder / f"{method}.yaml").write_text(yaml.safe_dump({"training": settings}))
    return folder


def quick_liver_probe(checkpoint: Path, data_list: Path, work: Path, cache: Path):
    """An AdaptConfig for one short linear-probe run on the liver (K = 1, one seed, no pictures)."""
    from fsseg.adapt.config import AdaptConfig

    return AdaptConfig(
        checkpoint=str(checkpoint),
        data_list=str(data_list),
        organs=["liver"],
        shots=[1],
        seeds=1,
        methods=["lp"],
        method_configs=str(write_method_configs(work / "methods", epochs=2)),
        cache_dir=str(cache),
        pictures=False,
    )


def cut_to_one_window(support, size: int = 32):
    """The support cut to one ``size``^3 window around its first target's centre, so that whatever a method caches
    over the whole scan equals what it computes on the one crop it can draw."""
    centre = np.argwhere(support.target[0]).mean(0).astype(int)
    shape = support.target.shape[1:]
    window = tuple(slice(s, s + size) for s in (np.clip(c - size // 2, 0, n - size) for c, n in zip(centre, shape)))
    support.image = support.image[(slice(None),) + window].clone()
    support.target = np.ascontiguousarray(support.target[(slice(None),) + window])
    support.key = f"one window of {support.key}"
    assert support.target.any()
    return support
