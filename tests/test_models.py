import pytest
import torch

from fsseg.checkpoint import load_model, read_checkpoint, save_checkpoint
from fsseg.errors import ConfigError, DataError
from fsseg.models import create_model, list_models
from fsseg.preprocessing import Preprocessing
from fsseg.templates import load_template

TINY = ["unet_tiny", "swinunetr_tiny"]


def test_registry_lists_every_model_and_rejects_unknown_names():
    assert {"swinunetr", "swinunetr_tiny", "unet", "unet_tiny"} <= set(list_models())
    with pytest.raises(ConfigError, match="unknown model 'swin'; available: .*swinunetr"):
        create_model("swin", num_classes=2)
    with pytest.raises(ConfigError, match="invalid arguments"):
        create_model("unet_tiny", num_classes=2, nonsense=3)


@pytest.mark.parametrize("name", TINY)
def test_features_then_head_is_the_forward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).eval()
    x = torch.randn(1, 1, 64, 64, 32)  # SwinUNETR needs multiples of 32
    with torch.no_grad():
        features = model.features(x)
        logits = model(x)
    assert features.shape == (1, model.feature_channels, 64, 64, 32)
    assert logits.shape == (1, 5, 64, 64, 32)
    assert torch.allclose(model.head(features), logits)


def test_swinunetr_48_matches_the_fseft_backbone_size():
    model = create_model("swinunetr", num_classes=29)
    assert model.feature_channels == 48
    total = sum(p.numel() for p in model.parameters())
    # 62,188,031 in the reference (its head is 48->29 on the same decoder1 features).
    assert total == 62_188_031
    groups = {g: sum(p.numel() for p in ps) for g, ps in model.parameter_groups().items()}
    assert groups["last_decoder_block"] == 209_664 and groups["head"] == 1_421


@pytest.mark.parametrize("name", TINY)
def test_parameter_groups_partition_the_model(name):
    model = create_model(name, num_classes=3)
    groups = model.parameter_groups()
    ids = {g: {id(p) for p in ps} for g, ps in groups.items()}
    assert ids["last_decoder_block"] and ids["last_decoder_block"] < ids["decoder"]
    assert not ids["encoder"] & ids["decoder"] and not ids["head"] & (ids["encoder"] | ids["decoder"])
    assert ids["encoder"] | ids["decoder"] | ids["head"] == {id(p) for p in model.parameters()}
    names = dict(model.named_parameters())
    for full_name, parameter in model.named_block_parameters("last_decoder_block"):
        assert names[full_name] is parameter


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    template = load_template()
    torch.manual_seed(0)
    model = create_model("unet_tiny", num_classes=len(template)).eval()
    path = save_checkpoint(
        tmp_path / "c.pt",
        {
            "arch": model.arch,
            "template": template.to_dict(),
            "preprocessing": Preprocessing().to_dict(),
            "state_dict": model.state_dict(),
        },
    )
    loaded, loaded_template, pre, payload = load_model(path)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert loaded_template.structures == template.structures and pre == Preprocessing()
    assert payload["versions"]["monai"]


def test_checkpoints_record_the_cpu_instruction_sets_and_their_cap(tmp_path, monkeypatch):
    # bfloat16 training differs between CPUs with and without AMX, so the record must say which one wrote it.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    model = create_model("unet_tiny", num_classes=2)
    path = save_checkpoint(tmp_path / "c.pt", {"arch": model.arch, "state_dict": model.state_dict()})
    cpu = torch.load(path, weights_only=False)["versions"]["cpu"]
    assert torch.backends.cpu.get_cpu_capability() in cpu.split() and cpu.endswith("ONEDNN_MAX_CPU_ISA=AVX512_CORE")


def test_bad_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "none.pt")
    torch.save({"module.swinViT.x": torch.zeros(1)}, tmp_path / "raw.pt")
    with pytest.raises(DataError, match="not an fsseg checkpoint"):
        read_checkpoint(tmp_path / "raw.pt")
    model = create_model("unet_tiny", num_classes=2)
    good = save_checkpoint(
        tmp_path / "good.pt",
        {
            "arch": model.arch,
            "template": {"name": "t", "structures": ["a", "b"], "ids": [1, 2]},
            "preprocessing": Preprocessing().to_dict(),
            "state_dict": model.state_dict(),
        },
    )
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(DataError, match="cannot read checkpoint: truncated"):
        read_checkpoint(tmp_path / "cut.pt")
