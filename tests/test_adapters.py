"""Adaptation methods: what each trains, identity at start, artifacts, TI loss, support sampling."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from fsseg.adapters import Composition, adapt_model, get_method, list_methods
from fsseg.adapters.artifact import load_adapted_model, save_adapter
from fsseg.adapters.methods import BiasConfig
from fsseg.adapters.peft_methods import LoRAConfig, target_layers, upgrade_lora_state
from fsseg.checkpoint import save_checkpoint
from fsseg.data.datalist import Case
from fsseg.data.sampling import CropSampler, sample_support
from fsseg.errors import ConfigError, DataError
from fsseg.losses.size_prior import organ_size_prior, size_constraint_loss
from fsseg.models import create_model
from fsseg.preprocessing import Preprocessing
from fsseg.templates import load_template
from fsseg.training.encoder_cache import EncoderCache

TEMPLATE = load_template()


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return create_model("swinunetr_tiny", num_classes=len(TEMPLATE)).eval()


def trainable_names(adapted):
    return {name for name, p in adapted.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", sorted(list_methods()))
def test_each_method_trains_only_what_it_should(swin, method):
    adapted = adapt_model(swin, TEMPLATE, ["liver", "heart"], method)
    names = trainable_names(adapted)
    head = {"head.weight", "head.bias"}
    assert head <= names and not any(n.startswith("base.head.") for n in names)
    backbone = {n for n in names if n.startswith("base.backbone.")}
    expected = {
        "lp": lambda n: False,
        "adapter": lambda n: False,
        "ft-last": lambda n: n.startswith("base.backbone.decoder1."),
        "ft": lambda n: True,
        "scratch": lambda n: True,
        "lora": lambda n: ".lora_" in n,
        "dora": lambda n: ".lora_" in n,  # lora_A, lora_B and the magnitude lora_magnitude_vector
        "ia3": lambda n: ".ia3_l." in n,
        "bias": lambda n: n.endswith(".bias"),
        "affine-ln": lambda n: ".norm" in n and n.startswith("base.backbone.swinViT."),
        "adaptformer": lambda n: ".adaptformer." in n,
    }[method]
    all_backbone = {n for n, _ in adapted.named_parameters() if n.startswith("base.backbone.")}
    assert backbone == {n for n in all_backbone if expected(n)}
    assert ({n for n in names if n.startswith("trunk.")} != set()) == (method == "adapter")
    assert adapted.backbone_frozen == (method in ("lp", "adapter"))
    x = torch.rand(1, 1, 64, 64, 32)
    if method in ("lora", "dora", "ia3", "adaptformer"):  # injected identity at start: the features are unchanged
        with torch.no_grad():
            assert torch.allclose(adapted.features(x), swin.features(x), atol=1e-6)
    if method == "bias":
        assert not any("relative_position_bias_table" in n for n in names)
    adapted.set_train_mode()
    for module in adapted.modules():
        assert module.training == any(p.requires_grad for p in module.parameters())
    # The pretrained model itself is left untouched.
    assert sum(p.requires_grad for p in swin.parameters()) == len(list(swin.parameters()))


def test_trainable_counts_on_the_62m_swinunetr_match_the_reference():
    base = create_model("swinunetr", num_classes=29)
    counts = {
        m: adapt_model(base, TEMPLATE, ["liver"], m).parameter_counts()[0] for m in ("lp", "adapter", "ft-last", "ft")
    }
    assert counts == {"lp": 49, "adapter": 124_465, "ft-last": 209_713, "ft": 62_186_659}
    assert counts["ft"] / counts["ft-last"] > 290  # the "~300x fewer parameters"


@pytest.mark.parametrize("method", ["adapter", "ft-last", "lora", "bias", "ft"])
def test_every_method_starts_from_the_linear_probe_model(swin, method):
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        reference = adapt_model(swin, TEMPLATE, ["liver"], "lp")(x)
        assert torch.allclose(adapt_model(swin, TEMPLATE, ["liver"], method)(x), reference, atol=1e-5)


def test_head_starts_from_the_template_row_or_fresh(swin):
    adapted = adapt_model(swin, TEMPLATE, ["gall", "heart"], "lp")
    row = TEMPLATE.channel("gallbladder")
    assert torch.equal(adapted.head.weight[0], swin.head.weight[row])
    assert not torch.equal(adapted.head.weight[1], swin.head.weight[row])
    assert adapted.structures == ["gallbladder", "heart"]


def test_peft_methods_need_matching_layers():
    unet = create_model("unet_tiny", num_classes=len(TEMPLATE))
    with pytest.raises(ConfigError, match="match no linear or 3D convolution layer"):
        adapt_model(unet, TEMPLATE, ["liver"], "lora", LoRAConfig(targets=r"attn\.qkv$"))
    resnet = create_model("i3resnet_tiny", num_classes=len(TEMPLATE))
    with pytest.raises(ConfigError, match="registers no layers for PEFT methods; set options.targets"):
        adapt_model(resnet, TEMPLATE, ["liver"], "ia3")
    with pytest.raises(ConfigError, match="unknown method 'prompt'"):
        adapt_model(unet, TEMPLATE, ["liver"], "prompt")
    swin = create_model("swinunetr_tiny", num_classes=2)
    found = target_layers(swin, r"attn\.qkv$", "lora")
    assert len(found) == 8 and not any("patch_embed" in n for n in found)


@pytest.mark.parametrize("arch, roi", [("swinunetr_tiny", 64), ("unet_tiny", 32)])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_peft_methods_train_only_their_parameters_on_swinunetr_and_the_unet(arch, roi, method):
    torch.manual_seed(0)
    base = create_model(arch, num_classes=len(TEMPLATE)).eval()
    adapted = adapt_model(base, TEMPLATE, ["liver"], method)
    marker = ".ia3_l." if method == "ia3" else ".lora_"
    trained = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trained and all(marker in n or n.startswith("head.") for n in trained)
    assert any(marker in n for n in trained) and any(n.startswith("head.") for n in trained)
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    adapted.set_train_mode()
    adapted(torch.rand(1, 1, roi, roi, roi)).square().mean().backward()
    optimizer.step()
    changed = {n for n, p in adapted.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trained


def test_an_adapter_file_of_the_hand_written_lora_loads_in_peft_names():
    old = {
        "base.backbone.x.attn.qkv.lora_a.weight": 1,
        "base.backbone.x.attn.qkv.lora_b.weight": 2,
        "base.backbone.x.attn.qkv.base.weight": 3,
        "head.weight": 4,
    }
    assert upgrade_lora_state(old) == {
        "base.backbone.x.attn.qkv.lora_A.default.weight": 1,
        "base.backbone.x.attn.qkv.lora_B.default.weight": 2,
        "base.backbone.x.attn.qkv.base_layer.weight": 3,
        "head.weight": 4,
    }


@pytest.mark.parametrize("method", sorted(list_methods()))
def test_adapter_file_round_trip_and_base_check(tmp_path, swin, method):
    template = TEMPLATE
    base_path = save_checkpoint(
        tmp_path / "base.pt",
        {
            "arch": swin.arch,
            "template": template.to_dict(),
            "preprocessing": Preprocessing().to_dict(),
            "state_dict": swin.state_dict(),
        },
    )
    adapted = adapt_model(swin, template, ["liver"], method)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    options = get_method(method).config_cls()
    path = save_adapter(tmp_path / "a.pt", adapted, method, options, base_path, Preprocessing())
    if method not in ("ft", "scratch"):
        assert path.stat().st_size < 500_000 < base_path.stat().st_size  # only the trained tensors
    loaded, pre, info = load_adapted_model(path, base_path)
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), adapted(x), atol=1e-6)
    assert info["structures"] == ["liver"] and pre == Preprocessing()
    other = save_checkpoint(
        tmp_path / "other.pt",
        {
            "arch": swin.arch,
            "template": template.to_dict(),
            "preprocessing": Preprocessing(spacing=(2, 2, 2)).to_dict(),
            "state_dict": swin.state_dict(),
        },
    )
    with pytest.raises(DataError, match="was trained on another base checkpoint"):
        load_adapted_model(path, other)


def test_support_sampling_is_deterministic_and_bounded():
    pool = [Case(id=f"c{i}", image=f"c{i}.nii.gz") for i in range(10)]
    first = [c.id for c in sample_support(pool, 3, seed=1)]
    assert first == [c.id for c in sample_support(list(reversed(pool)), 3, seed=1)]
    assert first != [c.id for c in sample_support(pool, 3, seed=2)]
    with pytest.raises(DataError, match="K=11 shots asked for, but only 10 train case"):
        sample_support(pool, 11, seed=0)


def test_strided_crops_cover_the_full_crop_region_at_every_nth_voxel():
    label = np.zeros((1, 60, 50, 40), np.uint8)
    label[0, 20:40, 20:30, 10:30] = 1
    full = CropSampler(label, (32, 32, 32)).slices(50, np.random.RandomState(0))
    strided = CropSampler(label, (32, 32, 32), stride=2).slices(50, np.random.RandomState(0))
    offsets = set()
    for whole, every2nd in zip(full, strided):
        for a, b in zip(whole[1:], every2nd[1:]):
            assert b.step == 2 and a.start <= b.start <= a.start + 1 and b.stop == a.stop
            offsets.add(b.start - a.start)
        assert label[every2nd].shape[1:] == (16, 16, 16)
    assert offsets == {0, 1}
    with pytest.raises(ValueError, match="stride"):
        CropSampler(label, (32, 32, 32), stride=0)


def test_negative_crops_are_centred_inside_the_body_not_in_air_or_padding():
    label = np.zeros((1, 60, 50, 40), np.uint8)
    label[0, 25:30, 20:25, 15:20] = 1
    image = np.zeros((1, 60, 50, 40), np.float32)  # 0: air and padding after the HU window
    image[0, 15:45, 10:40, 5:35] = 0.4
    crop = (8, 8, 8)
    centres = [
        tuple(s.start + c // 2 for s, c in zip(slices[1:], crop))
        for slices in CropSampler(label, crop, pos=0, neg=1, body=image).slices(200, np.random.RandomState(0))
    ]
    assert all(image[(0, *c)] > 0 and not label[(0, *c)] for c in centres)
    anywhere = CropSampler(label, crop, pos=0, neg=1).slices(200, np.random.RandomState(0))
    assert any(image[(0, *(s.start + c // 2 for s, c in zip(slices[1:], crop)))] == 0 for slices in anywhere)


@pytest.fixture(scope="module")
def swin48():
    return create_model("swinunetr", num_classes=len(TEMPLATE)).eval()


@pytest.mark.parametrize(
    "method, options, compose, trainable",
    [
        ("lp", None, None, 49),
        ("adapter", None, None, 124_465),
        ("ft-last", None, None, 209_713),
        ("ft", None, None, 62_186_659),
        ("lora", None, None, 34_609),
        (
            "lora",
            LoRAConfig(rank=12, alpha=12, targets=r"swinViT\.layers\d\.\d\.blocks\.\d+\.attn\.qkv$"),
            None,
            69_169,
        ),
        ("bias", None, None, 21_697),
        ("bias", BiasConfig("reference"), None, 210_739),
        ("affine-ln", None, None, 17_329),
        ("adaptformer", None, None, 47_697),
        ("lp", None, Composition(decoder="fine-tuned"), 19_597_873),
        (
            "lora",
            LoRAConfig(rank=12, alpha=12, targets=r"swinViT\.layers\d\.\d\.blocks\.\d+\.attn\.qkv$"),
            Composition(decoder="fine-tuned"),
            19_666_993,
        ),
    ],
)
def test_trainable_parameters_match_the_reference_counts_on_swinunetr_48(swin48, method, options, compose, trainable):
    # The reference's table for one binary structure (method.md section 3.2); its head row is 48 + 1.
    assert adapt_model(swin48, TEMPLATE, ["liver"], method, options, compose).parameter_counts()[0] == trainable


def test_composition_freezes_fine_tunes_or_renews_the_decoder_and_bottleneck(swin):
    decoder = {n for n, _ in swin.named_block_parameters("decoder")}
    bottleneck = {n for n, _ in swin.named_block_parameters("bottleneck")}
    new = adapt_model(swin, TEMPLATE, ["liver"], "lora", None, Composition(decoder="new", bottleneck="fine-tuned"))
    names = {n.removeprefix("base.") for n in trainable_names(new)}
    assert decoder | bottleneck <= names and any(".lora_" in n for n in names)
    pretrained, renewed = dict(swin.named_parameters()), dict(new.base.named_parameters())
    assert all(torch.equal(pretrained[n], renewed[n]) for n in bottleneck)
    assert not any(torch.equal(pretrained[n], renewed[n]) for n in decoder if n.endswith("conv.weight"))
    frozen = adapt_model(swin, TEMPLATE, ["liver"], "ft", None, Composition(bottleneck="frozen"))
    assert not {n.removeprefix("base.") for n in trainable_names(frozen)} & bottleneck
    with pytest.raises(ConfigError, match="compose.decoder 'tuned' is not one of"):
        Composition(decoder="tuned")


def test_only_pointwise_heads_count_as_per_voxel(swin):
    assert adapt_model(swin, TEMPLATE, ["liver"], "lp").per_voxel_head
    assert not adapt_model(swin, TEMPLATE, ["liver"], "adapter").per_voxel_head
    config = get_method("adapter").config_cls(kernel_size=1)
    assert adapt_model(swin, TEMPLATE, ["liver"], "adapter", config).per_voxel_head


def test_size_constraint_values_and_gradient_sign():
    target = 0.10
    for form in ("absolute", "relative"):
        inside = torch.tensor(0.11, requires_grad=True)
        assert size_constraint_loss(inside, target, gamma=0.3, form=form).item() == 0.0
        too_big = torch.tensor(0.20, requires_grad=True)
        loss = size_constraint_loss(too_big, target, gamma=0.3, form=form)
        loss.backward()
        assert loss.item() > 0 and too_big.grad > 0  # descending shrinks the prediction
        too_small = torch.tensor(0.02, requires_grad=True)
        size_constraint_loss(too_small, target, gamma=0.3, form=form).backward()
        assert too_small.grad < 0  # descending grows it
    absolute = size_constraint_loss(torch.tensor(0.20), target, gamma=0.3, form="absolute")
    assert absolute.item() == pytest.approx(0.10 - 0.03)
    relative = size_constraint_loss(torch.tensor(0.20), target, gamma=0.3, form="relative")
    assert relative.item() == pytest.approx(0.5 - 0.3)


def test_organ_size_prior_uses_largest_component_and_trims():
    def mask(size, speck=True):
        m = np.zeros((20, 20, 20), bool)
        m[: size // 100, :10, :10] = True
        if speck:
            m[19, 19, 19] = True  # a stray voxel: not the organ
        return m

    assert organ_size_prior([mask(400)]) == 400
    sizes = [400, 500, 600, 500, 1900]
    assert organ_size_prior([mask(s) for s in sizes]) == pytest.approx(np.mean([400, 500, 600, 500]))


class SyntheticRun:
    """What the training loop reads of a run, over one synthetic scan the size of one window."""

    def __init__(self, base, folder: Path) -> None:
        self.device, self.pre = torch.device("cpu"), Preprocessing(roi=(64, 64, 32))
        self.base, self.folder = base, folder

    def features(self, support):
        with torch.no_grad():
            return self.base.features(support.image[None])[0].to(torch.float16).numpy()

    def encoded(self, support):
        return EncoderCache(self.folder, self.base, "synthetic").encode(support.key, support.image)


@pytest.fixture(scope="module")
def i3resnet():
    """A network with batch norm: a frozen norm left in train mode would move its running statistics."""
    torch.manual_seed(0)
    return create_model("i3resnet_tiny", num_classes=len(TEMPLATE)).eval()


@pytest.fixture(scope="module")
def nnunet():
    """An nnU-Net network: its blocks are named by dotted paths inside the backbone."""
    pytest.importorskip("dynamic_network_architectures", reason="nnU-Net networks need dynamic-network-architectures")
    from test_nnunet import ARCHITECTURE

    torch.manual_seed(0)
    return create_model(
        "nnunet",
        num_classes=len(TEMPLATE),
        network_class=ARCHITECTURE["network_class_name"],
        arch_kwargs=ARCHITECTURE["arch_kwargs"],
        requires_import=ARCHITECTURE["_kw_requires_import"],
        input_scale=2.0,
        input_shift=-1.0,
    ).eval()


@pytest.mark.parametrize(
    "model, method",
    [("swin", m) for m in sorted(list_methods())]
    + [("i3resnet", m) for m in ("lp", "adapter", "ft-last", "bias", "affine-ln")]
    + [("nnunet", m) for m in ("lp", "ft-last", "bias", "affine-ln")],
)
def test_training_changes_only_the_parameters_a_method_trains(request, tmp_path, model, method):
    from fsseg.adapt.config import TrainingConfig
    from fsseg.adapt.training import Support, train

    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, 64, 64, 32), dtype=np.float32))
    target = np.zeros((1, 64, 64, 32), np.uint8)
    target[0, 20:40, 24:44, 8:24] = 1
    support = Support(Case("s", Path("s.nii.gz")), image, target, "s")
    base = copy.deepcopy(request.getfixturevalue(model))
    adapted = adapt_model(base, TEMPLATE, ["liver"], method)
    before = {n: t.clone() for n, t in adapted.state_dict().items()}
    # What may change: the trained parameters, and the statistics of a norm whose own affine parameters train.
    # (a module registered under two names, as nnU-Net's convolutions are, shows a trained tensor under both)
    trained = (
        trainable_names(adapted)
        | {name for name, tensor in adapted.state_dict(keep_vars=True).items() if tensor.requires_grad}
        | {
            f"{name}.{buffer}"
            for name, module in adapted.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))
            for buffer, _ in module.named_buffers(recurse=False)
        }
    )
    # Weight decay and a large step: every trained tensor moves, so a frozen one that moved would show.
    training = TrainingConfig(
        lr=1e-1, weight_decay=0.1, epochs=2, warmup_epochs=0, steps_per_epoch=1, crops_per_volume=1, crop_size=None
    )
    train(adapted, [support], SyntheticRun(base, tmp_path), training, seed=0)
    changed = {n for n, t in adapted.state_dict().items() if not torch.equal(t, before[n])}
    assert changed and changed <= trained, sorted(changed - trained)[:5]


def test_adapter_files_are_safetensors_with_json_metadata(tmp_path, swin):
    """Reading an adapter file executes no code: tensors in safetensors, everything else as JSON in its header."""
    import json

    from safetensors import safe_open

    checkpoint = save_checkpoint(
        tmp_path / "base.pt",
        {
            "arch": swin.arch,
            "template": TEMPLATE.to_dict(),
            "preprocessing": Preprocessing().to_dict(),
            "state_dict": swin.state_dict(),
        },
    )
    adapted = adapt_model(swin, TEMPLATE, ["liver"], "adapter")
    path = save_adapter(
        tmp_path / "liver.safetensors",
        adapted,
        "adapter",
        get_method("adapter").config_cls(),
        checkpoint,
        Preprocessing(),
    )
    with safe_open(str(path), framework="pt") as handle:  # safetensors' own reader, nothing of fsseg's
        names = set(handle.keys())
        metadata = json.loads(handle.metadata()["fsseg"])
    assert names == set(adapted.trainable_state_dict())
    assert metadata["kind"] == "adapter" and metadata["method"] == "adapter" and metadata["structures"] == ["liver"]
    assert metadata["format"] == "fsseg-checkpoint" and "torch" in metadata["versions"]
