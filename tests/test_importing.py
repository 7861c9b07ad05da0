"""Importing published weights: each key layout, coverage failures, auto-detection, fsseg-inspect."""

import pytest
import torch

from fsseg.checkpoint import load_model
from fsseg.cli.import_checkpoint import main as import_checkpoint
from fsseg.cli.inspect import main as inspect
from fsseg.models import create_model
from fsseg.templates import load_template

FSEFT = load_template("fseft29")


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(1)
    return create_model("swinunetr_tiny", num_classes=len(FSEFT)).eval()


@pytest.fixture(scope="module")
def unet3d():
    torch.manual_seed(2)
    model = create_model("unet3d", num_classes=1).eval()
    for module in model.modules():  # non-trivial running statistics, as in trained weights
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def text_head(rows):
    return {
        "module.organ_embedding": torch.randn(rows, 512),
        "module.precls_conv.1.weight": torch.randn(8, 48, 1, 1, 1),
        "module.GAP.2.weight": torch.randn(256, 768, 1, 1, 1),
        "module.controller.weight": torch.randn(153, 512, 1, 1, 1),
        "module.text_to_vision.weight": torch.randn(256, 512),
    }


def published(model, layout):
    """The model's weights written the way the published files store them."""
    state = model.state_dict()
    if layout == "fseft":
        return {
            "module." + (("classifier." + k[5:]) if k.startswith("head.") else k[len("backbone.") :]): v
            for k, v in state.items()
        }
    if layout in ("clip-driven", "suprem-swinunetr", "suprem-unet"):
        net = {"module." + k: v for k, v in state.items() if k.startswith("backbone.")}
        net.update(text_head(32 if layout == "clip-driven" else 25))
        return {"net": net, "epoch": 100}
    swin = {
        "module." + k[len("backbone.swinViT.") :].replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2"): v
        for k, v in state.items()
        if k.startswith("backbone.swinViT.")
    }
    swin["module.rotation_head.weight"] = torch.randn(4, 96)
    swin["module.contrastive_head.weight"] = torch.randn(512, 96)
    return {"state_dict": swin}


@pytest.mark.parametrize("layout", ["fseft", "clip-driven", "suprem-swinunetr", "monai-ssl-swin"])
def test_swin_layouts_import_with_full_coverage_and_same_outputs(swin, tmp_path, capsys, layout):
    source = tmp_path / "published.pth"
    torch.save(published(swin, layout), source)
    out = tmp_path / "imported.pt"
    assert import_checkpoint([str(source), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"format: {layout} (detected from the keys)" in printed
    assert "block" in printed and "missing" in printed  # the coverage table
    model, template, pre, payload = load_model(out)
    model.eval()
    assert payload["source"]["format"] == layout and pre.roi == (96, 96, 96) and pre.spacing == (1.5, 1.5, 1.5)
    assert model.arch["kwargs"]["feature_size"] == 12
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        if layout == "monai-ssl-swin":  # the encoder alone: its hidden states match
            for ours, theirs in zip(model.backbone.swinViT(x), swin.backbone.swinViT(x)):
                assert torch.allclose(ours, theirs, atol=1e-5)
        else:
            assert torch.allclose(model.features(x), swin.features(x), atol=1e-5)
    if layout == "fseft":
        assert torch.equal(model.head.weight, swin.head.weight) and template.name == "fseft29"
    else:
        assert "head:" in printed


def test_suprem_unet_imports_into_the_unet3d_backbone(unet3d, tmp_path, capsys):
    source = tmp_path / "supervised_suprem_unet_2100.pth"
    torch.save(published(unet3d, "suprem-unet"), source)
    out = tmp_path / "unet.pt"
    assert import_checkpoint([str(source), "--format", "auto", "-o", str(out)]) == 0
    assert "format: suprem-unet" in capsys.readouterr().out
    model, template, _, _ = load_model(out)
    assert model.arch["name"] == "unet3d" and template.name == "abdomenatlas25"
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():  # running statistics in eval mode: each sample is normalised the same way alone
        assert torch.allclose(model.eval().features(x), unet3d.features(x), atol=1e-5)
        assert torch.allclose(model.features(x[:1]), unet3d.features(x)[:1], atol=1e-5)


def test_missing_renamed_or_reshaped_tensors_fail_naming_the_block(swin, tmp_path, capsys):
    state = published(swin, "fseft")
    missing = {k: v for k, v in state.items() if not k.startswith("module.decoder3.")}
    torch.save(missing, tmp_path / "missing.pth")
    assert import_checkpoint([str(tmp_path / "missing.pth"), "-o", str(tmp_path / "a.pt")]) == 2
    assert "block(s) decoder:decoder3" in capsys.readouterr().err
    reshaped = dict(state)
    reshaped["module.encoder2.layer.conv1.conv.weight"] = torch.zeros(3, 3, 3, 3, 3)
    torch.save(reshaped, tmp_path / "shape.pth")
    assert import_checkpoint([str(tmp_path / "shape.pth"), "-o", str(tmp_path / "b.pt")]) == 2
    assert "encoder:encoder2" in capsys.readouterr().err
    renamed = {k.replace("decoder1.", "decoder_one."): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    assert import_checkpoint([str(tmp_path / "renamed.pth"), "-o", str(tmp_path / "c.pt")]) == 2
    assert "decoder:decoder1" in capsys.readouterr().err
    data = (tmp_path / "missing.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    assert import_checkpoint([str(tmp_path / "cut.pth"), "-o", str(tmp_path / "d.pt")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("a.pt", "b.pt", "c.pt", "d.pt"))


def test_head_needs_drop_head_or_maps_by_name(swin, tmp_path, capsys):
    state = published(swin, "fseft")
    no_head = {k: v for k, v in state.items() if "classifier" not in k}
    no_head["module.classifier.weight"] = torch.zeros(5, 12, 1, 1, 1)  # some other head
    no_head["module.classifier.bias"] = torch.zeros(5)
    torch.save(no_head, tmp_path / "other_head.pth")
    assert import_checkpoint([str(tmp_path / "other_head.pth"), "-o", str(tmp_path / "a.pt")]) == 2
    assert "add --drop-head" in capsys.readouterr().err
    assert import_checkpoint([str(tmp_path / "other_head.pth"), "-o", str(tmp_path / "a.pt"), "--drop-head"]) == 0

    torch.save(state, tmp_path / "fseft.pth")
    assert (
        import_checkpoint([str(tmp_path / "fseft.pth"), "-o", str(tmp_path / "clip.pt"), "--template", "clip32"]) == 0
    )
    assert "taken from the 'fseft29' head by name" in capsys.readouterr().out
    model, template, _, _ = load_model(tmp_path / "clip.pt")
    assert torch.equal(
        model.head.weight[template.channel("kidney_cyst")], swin.head.weight[FSEFT.channel("kidney_cyst")]
    )


def test_unknown_layout_and_inspect(swin, tmp_path, capsys):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "odd.pth")
    assert import_checkpoint([str(tmp_path / "odd.pth"), "-o", str(tmp_path / "x.pt")]) == 2
    assert "cannot tell the layout" in capsys.readouterr().err
    torch.save(published(swin, "fseft"), tmp_path / "fseft.pth")
    assert import_checkpoint([str(tmp_path / "fseft.pth"), "-o", str(tmp_path / "f.pt")]) == 0
    capsys.readouterr()
    assert inspect([str(tmp_path / "f.pt")]) == 0
    printed = capsys.readouterr().out
    assert "architecture: swinunetr {'feature_size': 12}" in printed and "last_decoder_block" in printed
    assert "template: fseft29" in printed and "spacing [1.5, 1.5, 1.5]" in printed
    assert inspect([str(tmp_path / "fseft.pth")]) == 2
    assert "fsseg-import-checkpoint" in capsys.readouterr().err


def test_import_checkpoint_from_python_returns_what_it_read_and_names_the_layouts_of_a_wrong_one(swin, tmp_path):
    from fsseg.errors import ConfigError
    from fsseg.importing import import_checkpoint as import_from_python

    torch.save(published(swin, "fseft"), tmp_path / "fseft.pth")
    imported = import_from_python(tmp_path / "fseft.pth", tmp_path / "f.pt")
    assert (imported.layout, imported.detected, imported.template) == ("fseft", True, "fseft29")
    assert imported.arch == {"name": "swinunetr", "kwargs": {"feature_size": 12}} and imported.path.is_file()
    with pytest.raises(ConfigError, match="unknown format 'fset'; expected auto, nnunet or one of fseft, clip-driven"):
        import_from_python(tmp_path / "fseft.pth", tmp_path / "g.pt", layout="fset")
    assert not (tmp_path / "g.pt").exists()
