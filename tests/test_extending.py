"""fsseg extended from outside the package: a module of the user's registers a backbone, an adaptation method and
a scan format, and fsseg's own commands pretrain nothing, adapt and predict with them end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np

PLUGIN = '''
"""A user's extension of fsseg: one backbone, one method, one scan format."""
import json
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from torch import nn

from fsseg.adapters import register_method
from fsseg.adapters.methods import frozen_with_head
from fsseg.data.io import Volume
from fsseg.files import atomic_path
from fsseg.data.scans import ScanFormat, register_format
from fsseg.models import register_model


def toy_backbone():
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1)), 4


register_model("toy_conv", toy_backbone, {}, {"encoder": ["0"], "decoder": ["2"], "last_decoder_block": ["2"]},
               "two convolutions, for the extension test", peft_targets=r"^[02]$")


@dataclass
class ChannelScaleOptions:
    """No options of its own."""


@register_method("channel-scale", ChannelScaleOptions, frozen_backbone=True, description="a scale per feature")
def channel_scale(base, template, structures, config):
    trunk = nn.Conv3d(base.feature_channels, base.feature_channels, 1, groups=base.feature_channels)
    return frozen_with_head(base, template, structures, True, trunk)


class NumpyVolume(ScanFormat):
    """<name>.vol.npy voxels beside <name>.vol.json holding the voxel-to-RAS affine."""

    name = "NumPy volume (.vol.npy)"
    mask_suffix = ".vol.npy"

    def claims(self, path):
        return path.name.endswith(".vol.npy")

    def stem(self, path):
        return path.name.removesuffix(".vol.npy")

    def _affine(self, path):
        return np.asarray(json.loads(path.with_name(self.stem(path) + ".vol.json").read_text()))

    def grid(self, path):
        return nib.Nifti1Image(np.broadcast_to(np.int16(0), np.load(path, mmap_mode="r").shape), self._affine(path))

    def read(self, path):
        image = self.grid(path)
        return Volume(np.load(path), image.affine, image.header, path)

    def files(self, path):
        return [path, path.with_name(self.stem(path) + ".vol.json")]

    def write_mask(self, array, scan, reference, out):
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, array)
        out.with_name(self.stem(out) + ".vol.json").write_text(json.dumps(reference.affine.tolist()))
        return out


register_format(NumpyVolume())
'''

RUN = """
import sys
import toy_plugin  # noqa: F401  (registers the backbone, the method and the format)
from fsseg.adapt.cli import main as adapt
from fsseg.cli.predict import main as predict

work = sys.argv[1]
assert adapt(["--checkpoint", f"{work}/toy.pt", "--data-list", f"{work}/toy_list.json", "--organ", "liver",
              "--method", "channel-scale", "lora", "--shots", "1", "--seeds", "1", "--out", f"{work}/adapt",
              "--set", f"method_configs={work}/configs", "--set", "pictures=false", "--no-progress"]) == 0
assert predict(["-i", f"{work}/scans", "--out", f"{work}/masks", "--checkpoint", f"{work}/toy.pt", "--adapter",
                f"{work}/adapt/adapters/liver_channel-scale_k1_s0.safetensors", "--no-progress"]) == 0
"""


def toy_data(phantom_dir, work) -> None:
    """The phantom target's images as NumPy volumes (labels stay NIfTI), its list, and a scan folder."""
    listed = json.loads((phantom_dir / "phantom_target.json").read_text())
    root = phantom_dir / listed["root"]
    (work / "scans").mkdir()
    for case in listed["cases"]:
        image = nib.load(root / case["image"])
        folder = work / ("scans" if case["split"] == "test" else "images")
        folder.mkdir(exist_ok=True)
        np.save(folder / f"{case['id']}.vol.npy", np.asarray(image.dataobj, dtype=np.float32))
        (folder / f"{case['id']}.vol.json").write_text(json.dumps(image.affine.tolist()))
        case["image"] = str(folder / f"{case['id']}.vol.npy")
        case["label"] = str(root / case["label"])
    listed["root"] = str(work)
    (work / "toy_list.json").write_text(json.dumps(listed))


def toy_checkpoint(work) -> None:
    import torch
    from torch import nn

    from fsseg.checkpoint import save_checkpoint
    from fsseg.models.base import SegmentationModel
    from fsseg.preprocessing import Preprocessing
    from fsseg.templates import load_template

    template = load_template()
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1))
    blocks = {"encoder": ["0"], "decoder": ["2"], "last_decoder_block": ["2"]}
    model = SegmentationModel(backbone, 4, len(template), blocks, {"name": "toy_conv", "kwargs": {}})
    pre = Preprocessing(spacing=(4.0, 4.0, 4.0), roi=(16, 16, 16))
    save_checkpoint(
        work / "toy.pt",
        {
            "arch": model.arch,
            "template": template.to_dict(),
            "preprocessing": pre.to_dict(),
            "state_dict": model.state_dict(),
        },
    )


def test_a_backbone_a_method_and_a_format_registered_from_outside_run_end_to_end(phantom_dir, tmp_path):
    toy_data(phantom_dir, tmp_path)
    toy_checkpoint(tmp_path)
    (tmp_path / "configs").mkdir()
    schedule = "training: {epochs: 2, steps_per_epoch: 2, crops_per_volume: 2, warmup_epochs: 1}\n"
    (tmp_path / "configs" / "channel-scale.yaml").write_text("options: {}\n" + schedule)
    (tmp_path / "configs" / "lora.yaml").write_text("options: {rank: 2}\n" + schedule)
    (tmp_path / "toy_plugin.py").write_text(PLUGIN)
    (tmp_path / "run.py").write_text(RUN)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "adapt" / "results.json").read_text())
    assert {row["method"] for row in results["rows"]} == {"channel-scale", "lora"}  # LoRA on its own placement
    tests = sorted(p.name for p in (tmp_path / "scans").glob("*.vol.npy"))
    for name in tests:  # each mask in the scan's format, on its grid
        mask, scan = np.load(tmp_path / "masks" / name), np.load(tmp_path / "scans" / name)
        assert mask.shape == scan.shape and mask.dtype == np.uint8
    assert tests and json.loads((tmp_path / "masks" / "labels.json").read_text())["1"] == "liver"
