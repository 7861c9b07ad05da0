"""fsseg-adapt end to end: phantoms and real CT, cached vs live features, transductive runs, bad input."""

import copy
import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import TOTALSEG_LIST, cut_to_one_window, write_method_configs
from fsseg.adapt.cli import main
from fsseg.adapt.config import AdaptConfig, TrainingConfig
from fsseg.adapt.engine import Adaptation, predict_query
from fsseg.adapt.training import train
from fsseg.adapters import adapt_model
from fsseg.adapters.artifact import load_adapted_model, read_adapter_file
from fsseg.checkpoint import read_checkpoint
from fsseg.cli.predict import main as predict


def adapt_args(checkpoint, data_list, out, configs, *extra, cache=None):
    return [
        "--checkpoint",
        str(checkpoint),
        "--data-list",
        str(data_list),
        "--out",
        str(out),
        "--set",
        f"method_configs={configs}",
        "--set",
        "overlap=0.25",
        "--no-progress",
        *extra,
        *(["--set", f"cache_dir={cache}"] if cache else []),
    ]


def test_adapt_on_phantoms_writes_table_results_and_adapters(phantom_dir, tiny_checkpoint, tmp_path, capsys):
    configs = write_method_configs(tmp_path / "configs", epochs=3)
    out = tmp_path / "run"
    code = main(
        adapt_args(
            tiny_checkpoint,
            phantom_dir / "phantom_target.json",
            out,
            configs,
            "--organ",
            "gallbladder",
            "--shots",
            "1",
            "2",
            "--method",
            "lp",
            "adapter",
            "ft-last",
            "--seeds",
            "1",
        )
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Dice on the test cases, gallbladder" in printed and "K=1" in printed and "K=2" in printed
    for method in ("lp", "adapter", "ft-last"):
        assert any(line.startswith(method) for line in printed.splitlines())
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 2 * 2  # methods x K x test cases
    assert {r["method"] for r in rows} == {"lp", "adapter", "ft-last"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    assert {r["trainable_params"] for r in rows if r["method"] == "lp"} == {"9"}
    # Methods of one (K, seed) saw the same support set.
    supports = {(r["shots"], r["seed"]): set() for r in rows}
    for r in rows:
        supports[(r["shots"], r["seed"])].add(r["support"])
    assert all(len(s) == 1 for s in supports.values())
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]["gallbladder"]) == {"lp", "adapter", "ft-last"}
    adapters = sorted(p.name for p in (out / "adapters").iterdir())
    assert len(adapters) == 6 and "gallbladder_lp_k1_s0.safetensors" in adapters
    # Features were extracted once per scan and shared by every frozen-backbone run.
    assert len(list((out / "features").glob("*.npy"))) <= 5


def read_rows(out):
    with open(out / "results.csv") as handle:
        return list(csv.DictReader(handle))


def test_continue_keeps_finished_runs_and_redoes_changed_ones(
    phantom_dir, tiny_checkpoint, tmp_path, capsys, feature_cache
):
    import yaml

    configs = write_method_configs(tmp_path / "configs", epochs=2)
    out = tmp_path / "run"
    args = adapt_args(
        tiny_checkpoint,
        phantom_dir / "phantom_target.json",
        out,
        configs,
        "--organ",
        "liver",
        "--shots",
        "1",
        "--seeds",
        "1",
        cache=feature_cache,
    )
    assert main(args + ["--method", "lp"]) == 0
    first = read_rows(out)
    lp_file = out / "adapters" / "liver_lp_k1_s0.safetensors"
    stamp = lp_file.stat().st_mtime_ns
    assert main(args + ["--method", "lp", "adapter", "--continue"]) == 0
    second = read_rows(out)
    assert [r for r in second if r["method"] == "lp"] == first and lp_file.stat().st_mtime_ns == stamp
    assert sum(r["method"] == "adapter" for r in second) == len(first)
    (configs / "lp.yaml").write_text(yaml.safe_dump({"training": {"epochs": 3, "crops_per_volume": 2}}))
    assert main(args + ["--method", "lp", "adapter", "--continue"]) == 0
    third = read_rows(out)
    assert {r["epochs"] for r in third if r["method"] == "lp"} == {"3"}
    assert [r for r in third if r["method"] == "adapter"] == [r for r in second if r["method"] == "adapter"]
    capsys.readouterr()
    assert main(args + ["--method", "lp", "--continue", "--set", "overlap=0.5"]) == 2
    err = capsys.readouterr().err
    assert "comes from another checkpoint, data list" in err and "Traceback" not in err


def test_runs_sharing_a_cache_dir_compute_each_scans_features_once(phantom_dir, tiny_checkpoint, tmp_path):
    configs = write_method_configs(tmp_path / "configs", epochs=1)
    cache = tmp_path / "cache"

    def run(out, method, *extra):
        assert (
            main(
                adapt_args(
                    tiny_checkpoint,
                    phantom_dir / "phantom_target.json",
                    out,
                    configs,
                    "--organ",
                    "liver",
                    "--shots",
                    "1",
                    "--seeds",
                    "1",
                    "--method",
                    method,
                    "--set",
                    "pictures=false",
                    *extra,
                    cache=cache,
                )
            )
            == 0
        )
        assert not (out / "features").exists()
        return {p.name: p.stat().st_mtime_ns for p in (cache / "features").glob("*.npy")}

    first = run(tmp_path / "lp", "lp")
    assert len(first) == 3  # the support and the 2 test scans
    assert run(tmp_path / "adapter", "adapter") == first  # read, not computed or rewritten
    # Stitched features blend windows: another overlap gets entries of its own.
    assert len(run(tmp_path / "overlap", "lp", "--set", "overlap=0.5")) == 2 * len(first)


def test_a_runs_dice_does_not_depend_on_what_else_is_asked(phantom_dir, tiny_checkpoint, tmp_path, feature_cache):
    configs = write_method_configs(tmp_path / "configs", epochs=2)

    def scratch_run(out, *methods, resume=False):
        """Dice rows and trained weights of the scratch run (random weights: they show any shift of the RNG)."""
        args = adapt_args(
            tiny_checkpoint,
            phantom_dir / "phantom_target.json",
            out,
            configs,
            "--organ",
            "liver",
            "--shots",
            "1",
            "--seeds",
            "1",
            "--method",
            *methods,
            "--set",
            "pictures=false",
            cache=feature_cache,
        )
        assert main(args + (["--continue"] if resume else [])) == 0
        weights = read_adapter_file(out / "adapters" / "liver_scratch_k1_s0.safetensors")["state_dict"]
        return [(r["case"], r["dice"], r["nsd"]) for r in read_rows(out) if r["method"] == "scratch"], weights

    rows, weights = scratch_run(tmp_path / "alone", "scratch")
    # The adapter's first convolution is drawn before scratch's weights here: they must not shift.
    after_rows, after_weights = scratch_run(tmp_path / "after", "adapter", "scratch")
    assert after_rows == rows and all(torch.equal(weights[k], after_weights[k]) for k in weights)
    scratch_run(tmp_path / "continued", "scratch")
    continued_rows, _ = scratch_run(tmp_path / "continued", "adapter", "scratch", resume=True)
    assert continued_rows == rows


@pytest.mark.parametrize("method", ["lp", "adapter", "ft"])
def test_fsseg_predict_with_the_adapter_file_writes_the_masks_fsseg_adapt_scored(
    phantom_dir, tiny_checkpoint, tmp_path, method, feature_cache
):
    # The 3x3x3 spatial adapter is where stitching features and stitching per-window logits part ways; the run
    # scores at overlap 0.25 and fsseg-predict is not told so: the adapter file carries it.
    # learning rates at which the random-weight tiny UNet finds some liver within 15 steps
    configs = write_method_configs(
        tmp_path / "configs", epochs=15, crops_per_volume=4, lr={"lp": 1.0, "adapter": 0.1, "ft": 1e-2}[method]
    )
    out = tmp_path / "run"
    assert (
        main(
            adapt_args(
                tiny_checkpoint,
                phantom_dir / "phantom_target.json",
                out,
                configs,
                "--organ",
                "liver",
                "--shots",
                "1",
                "--method",
                method,
                "--seeds",
                "1",
                cache=feature_cache,
            )
        )
        == 0
    )
    adapter = out / "adapters" / f"liver_{method}_k1_s0.safetensors"
    adapted, pre, info = load_adapted_model(adapter, tiny_checkpoint)
    assert info["inference"]["overlap"] == 0.25
    config = AdaptConfig(
        checkpoint=str(tiny_checkpoint),
        data_list=str(phantom_dir / "phantom_target.json"),
        organs=["liver"],
        shots=[1],
        methods=[method],
        seeds=1,
        method_configs=str(configs),
        overlap=0.25,
        cache_dir=str(feature_cache),
    )
    run = Adaptation(config, out, torch.device("cpu"))  # the run's features, cached
    with open(out / "results.csv") as handle:
        rows = {r["case"]: r for r in csv.DictReader(handle)}
    found = []
    scans = tmp_path / "scans"
    scans.mkdir()
    for case in run.tests:
        (scans / f"{case.id}.nii.gz").symlink_to(case.image)
    assert (
        predict(
            [
                "-i",
                str(scans),
                "-o",
                str(tmp_path / "pred"),
                "-m",
                str(tiny_checkpoint),
                "--adapter",
                str(adapter),
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "pred" / "labels.json").read_text()) == {"0": "background", "1": "liver"}
    for case in run.tests:
        query = run.query(case)
        scored = predict_query(adapted, query, run).masks()["liver"]
        dice = 2 * (scored & query.masks["liver"]).sum() / (scored.sum() + query.masks["liver"].sum())
        assert dice == pytest.approx(float(rows[case.id]["dice"]), abs=1e-4)
        written = np.asanyarray(nib.load(str(tmp_path / "pred" / f"{case.id}.nii.gz")).dataobj) == 1
        assert np.array_equal(written, scored), f"{case.id}: {(written != scored).sum()} voxels differ"
        found.append(scored.sum())
    assert sum(found) > 0  # two empty masks would agree whatever the paths do
    assert info["shots"] == 1 and info["support"] == rows[run.tests[0].id]["support"].split()


def test_adapter_on_another_checkpoint_is_refused(phantom_dir, tiny_checkpoint, tmp_path):
    configs = write_method_configs(tmp_path / "configs", epochs=1)
    out = tmp_path / "run"
    assert (
        main(
            adapt_args(
                tiny_checkpoint,
                phantom_dir / "phantom_target.json",
                out,
                configs,
                "--organ",
                "liver",
                "--shots",
                "1",
                "--method",
                "lp",
                "--seeds",
                "1",
            )
        )
        == 0
    )
    other = tmp_path / "other.pt"
    payload = read_checkpoint(tiny_checkpoint)
    payload["preprocessing"]["overlap_note"] = "changed"
    torch.save(payload, other)
    image = (
        phantom_dir
        / "phantom_target"
        / json.loads((phantom_dir / "phantom_target.json").read_text())["cases"][0]["image"]
    )
    assert (
        predict(
            [
                "-i",
                str(image),
                "-o",
                str(tmp_path / "p2"),
                "-m",
                str(other),
                "--adapter",
                str(out / "adapters" / "liver_lp_k1_s0.safetensors"),
            ]
        )
        == 2
    )


def test_cached_features_train_the_linear_probe_exactly_like_live_features(phantom_dir, tiny_checkpoint, tmp_path):
    config = AdaptConfig(
        checkpoint=str(tiny_checkpoint),
        data_list=str(phantom_dir / "phantom_target.json"),
        organs=["liver"],
        shots=[1],
        methods=["lp"],
        seeds=1,
    )
    run = Adaptation(config, tmp_path, torch.device("cpu"))
    support = run.support(run.pool[0])
    # A support exactly one window large: the cached sliding-window features are the live features.
    cut_to_one_window(support)
    training = TrainingConfig(lr=1e-2, epochs=5, crops_per_volume=1, crop_size=None, steps_per_epoch=None)
    heads = {}
    for cached in (True, False):
        lp = adapt_model(run.base, run.template, ["liver"], "lp")
        result = train(lp, [support], run, training, seed=0, inputs="features" if cached else "image")
        heads[cached] = (lp.head.weight.detach().clone(), result.losses)
    assert torch.allclose(heads[True][0], heads[False][0], atol=2e-3)
    assert np.allclose(heads[True][1], heads[False][1], atol=2e-3)


def test_voxel_stride_is_refused_at_start_for_an_adapter_that_sees_neighbours(
    phantom_dir, tiny_checkpoint, tmp_path, capsys
):
    configs = write_method_configs(tmp_path / "configs", voxel_stride=2)
    out = tmp_path / "run"
    assert (
        main(
            adapt_args(
                tiny_checkpoint,
                phantom_dir / "phantom_target.json",
                out,
                configs,
                "--organ",
                "liver",
                "--shots",
                "1",
                "--method",
                "lp",
                "adapter",
            )
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "voxel_stride=2 needs a per-voxel head" in err and "'adapter'" in err and "Traceback" not in err
    assert not (out / "features").exists()


@pytest.mark.parametrize("method, stride", [("lp", 1), ("lp", 2), ("adapter", 1), ("ft-last", 1), ("ft", 1)])
def test_support_loss_falls(phantom_dir, tiny_checkpoint, tmp_path, method, stride):
    config = AdaptConfig(
        checkpoint=str(tiny_checkpoint),
        data_list=str(phantom_dir / "phantom_target.json"),
        organs=["liver"],
        shots=[2],
        methods=[method],
        seeds=1,
    )
    run = Adaptation(config, tmp_path, torch.device("cpu"))
    supports = [run.support(c) for c in run.pool[:2]]
    torch.manual_seed(0)
    adapted = adapt_model(run.base, run.template, ["liver"], method)
    before = fixed_crop_loss(adapted, supports, run)
    lr = {"lp": 1e-1, "adapter": 1e-1, "ft-last": 1e-2, "ft": 1e-2}[method]  # a random backbone learns slowly
    train(
        adapted,
        supports,
        run,
        TrainingConfig(lr=lr, epochs=24, crops_per_volume=2, voxel_stride=stride, steps_per_epoch=None),
        seed=0,
    )
    assert fixed_crop_loss(adapted, supports, run) < 0.9 * before


def test_micro_batches_train_like_the_whole_batch(phantom_dir, tiny_checkpoint, tmp_path):
    """What lets ft fit a GPU: crops one at a time train the same model as all crops at once."""
    config = AdaptConfig(
        checkpoint=str(tiny_checkpoint),
        data_list=str(phantom_dir / "phantom_target.json"),
        organs=["liver"],
        shots=[1],
        methods=["ft-last"],
        seeds=1,
    )
    run = Adaptation(config, tmp_path, torch.device("cpu"))
    supports = [run.support(run.pool[0])]
    torch.manual_seed(0)
    start = adapt_model(run.base, run.template, ["liver"], "ft-last")
    image = supports[0].image[None]
    with torch.no_grad():
        before = start(image)
    outputs, losses = {}, {}
    for micro in (None, 1):
        adapted = copy.deepcopy(start)
        result = train(
            adapted,
            supports,
            run,
            TrainingConfig(lr=1e-2, epochs=3, crops_per_volume=3, micro_batch=micro, steps_per_epoch=None),
            seed=0,
        )
        losses[micro] = result.losses
        with torch.no_grad():
            outputs[micro] = adapted.eval()(image)
    assert np.allclose(losses[None], losses[1], rtol=1e-5)
    # Weights are compared through the outputs: biases before an instance norm get no gradient, only rounding
    # noise that Adam scales up, and the norm removes them.
    change = (outputs[None] - before).abs().max()
    assert change > 0.1 and (outputs[1] - outputs[None]).abs().max() < 1e-3 * change


def steps_taken(result):
    return result.state["scheduler"]["last_epoch"]


def test_schedule_and_early_stop_take_as_many_steps_at_one_shot_as_at_three(phantom_dir, tiny_checkpoint, tmp_path):
    """The plateau stop never fires before window + patience epochs of steps_per_epoch steps, whatever K is."""
    config = AdaptConfig(
        checkpoint=str(tiny_checkpoint),
        data_list=str(phantom_dir / "phantom_target.json"),
        organs=["liver"],
        shots=[1],
        methods=["lp"],
        seeds=1,
    )
    run = Adaptation(config, tmp_path, torch.device("cpu"))
    training = TrainingConfig(
        lr=1e-2,
        epochs=50,
        steps_per_epoch=4,
        crops_per_volume=1,
        crop_size=(16, 16, 16),
        early_stop_window=2,
        early_stop_patience=3,
        early_stop_min_delta=10.0,
    )  # always flat
    taken = {}
    for shots in (1, 3):
        supports = [run.support(case) for case in run.pool[:shots]]
        result = train(adapt_model(run.base, run.template, ["liver"], "lp"), supports, run, training, seed=0)
        assert result.stopped and result.epochs == 2 + 3
        taken[shots] = steps_taken(result)
    assert taken == {1: 5 * 4, 3: 5 * 4}


def test_resumed_training_continues_the_crops_instead_of_replaying_them(phantom_dir, tiny_checkpoint, tmp_path):
    """What the transductive arm does after its support-only epochs: the same run as one straight call."""
    config = AdaptConfig(
        checkpoint=str(tiny_checkpoint),
        data_list=str(phantom_dir / "phantom_target.json"),
        organs=["liver"],
        shots=[3],
        methods=["adapter"],
        seeds=1,
    )
    run = Adaptation(config, tmp_path, torch.device("cpu"))
    supports = [run.support(case) for case in run.pool[:3]]  # 2 steps an epoch: a round spans two epochs
    training = TrainingConfig(lr=1e-2, epochs=6, steps_per_epoch=2, crops_per_volume=2, crop_size=(16, 16, 16))
    torch.manual_seed(0)
    start = adapt_model(run.base, run.template, ["liver"], "adapter")
    straight, halves = copy.deepcopy(start), copy.deepcopy(start)
    whole = train(straight, supports, run, training, seed=0)
    first = train(halves, supports, run, training, seed=0, until=3)
    second = train(halves, supports, run, training, seed=0, resume=first)
    assert second.losses == pytest.approx(whole.losses, rel=1e-5) and steps_taken(second) == 12
    for (name, a), b in zip(straight.state_dict().items(), halves.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_transductive_and_plain_runs_stop_by_the_same_rule(
    phantom_dir, tiny_checkpoint, tmp_path, caplog, feature_cache
):
    configs = write_method_configs(
        tmp_path / "configs", epochs=8, early_stop_window=1, early_stop_patience=2, early_stop_min_delta=10.0
    )  # the plateau stop fires as soon as it may: epoch 3
    epochs = {}
    for ti in ("--no-ti", "--ti"):
        out = tmp_path / ti
        assert (
            main(
                adapt_args(
                    tiny_checkpoint,
                    phantom_dir / "phantom_target.json",
                    out,
                    configs,
                    "--organ",
                    "liver",
                    "--shots",
                    "1",
                    "--method",
                    "lp",
                    "--seeds",
                    "1",
                    ti,
                    "--set",
                    "ti.warmup_epochs=2",
                    cache=feature_cache,
                )
            )
            == 0
        )
        with open(out / "results.csv") as handle:
            epochs[ti] = {int(r["epochs"]) for r in csv.DictReader(handle)}
    assert epochs == {"--no-ti": {3}, "--ti": {3}}


def fixed_crop_loss(adapted, supports, run, crops=4):
    """The training loss on the same crops of each support (a noise-free yardstick)."""
    from fsseg.data.sampling import CropSampler
    from fsseg.losses import PartialLabelLoss

    losses = []
    with torch.no_grad():
        for support in supports:
            for crop in CropSampler(support.target, run.pre.roi).slices(crops, np.random.RandomState(123)):
                x = support.image[crop][None]
                y = torch.from_numpy(support.target[crop][None].astype(np.float32))
                losses.append(PartialLabelLoss()(adapted.eval()(x), y, torch.ones(1, 1)).total.item())
    return float(np.mean(losses))


def test_transductive_rows_adapt_once_per_query(phantom_dir, tiny_checkpoint, tmp_path, feature_cache):
    configs = write_method_configs(tmp_path / "configs", epochs=6)
    out = tmp_path / "ti"
    assert (
        main(
            adapt_args(
                tiny_checkpoint,
                phantom_dir / "phantom_target.json",
                out,
                configs,
                "--organ",
                "liver",
                "--shots",
                "2",
                "--method",
                "lp",
                "adapter",
                "--seeds",
                "1",
                "--ti",
                "--set",
                "ti.warmup_epochs=3",
                cache=feature_cache,
            )
        )
        == 0
    )
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 and all(r["transductive"] == "True" for r in rows)
    assert all(int(r["epochs"]) == 6 for r in rows)


def test_transductive_needs_a_frozen_backbone(phantom_dir, tiny_checkpoint, tmp_path, capsys):
    assert (
        main(
            adapt_args(
                tiny_checkpoint,
                phantom_dir / "phantom_target.json",
                tmp_path / "x",
                write_method_configs(tmp_path / "m"),
                "--organ",
                "liver",
                "--shots",
                "1",
                "--method",
                "ft",
                "--ti",
            )
        )
        == 2
    )
    assert "--ti needs a frozen backbone" in capsys.readouterr().err


def test_adapt_liver_on_real_ct_one_shot(sample_ct, tiny_checkpoint, tmp_path):
    configs = write_method_configs(tmp_path / "configs", epochs=3)
    out = tmp_path / "real"
    assert (
        main(
            adapt_args(
                tiny_checkpoint,
                TOTALSEG_LIST,
                out,
                configs,
                "--organ",
                "liver",
                "--shots",
                "1",
                "--method",
                "lp",
                "--seeds",
                "1",
            )
        )
        == 0
    )
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["case"] for r in rows} == {"lidc_0001_abd_1p4mm"}
    # The support comes from the other subjects (TS-A, TS-B), never from the LIDC scan being tested.
    assert all(not r["support"].startswith("lidc") for r in rows)


def test_subject_shared_with_a_test_case_is_left_out(sample_ct, tiny_checkpoint, tmp_path):
    data = json.loads(TOTALSEG_LIST.read_text())
    data["root"] = str(sample_ct)
    for case in data["cases"]:
        if case["id"] == "ts_example_ct_sm":
            case["split"] = "test"  # slices of the train case ts_example_ct (subject TS-A)
    path = tmp_path / "leaky.json"
    path.write_text(json.dumps(data))
    config = AdaptConfig(
        checkpoint=str(tiny_checkpoint), data_list=str(path), organs=["liver"], shots=[1], methods=["lp"], seeds=1
    )
    run = Adaptation(config, tmp_path / "run", torch.device("cpu"))
    assert [c.id for c in run.pool] == ["ts_example_dicom"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--organ", "heart", "--shots", "1"], "no case annotates heart"),
        (["--organ", "liver", "--shots", "9"], "K=9 shots asked for, but only 3 train case"),
        (["--organ", "liver", "--shots", "1", "--method", "prompt"], "unknown method 'prompt'"),
        # A folder without lp.yaml: never the built-in defaults in silence.
        (
            ["--organ", "liver", "--shots", "1", "--method", "lp", "--set", "method_configs=elsewhere"],
            "elsewhere/lp.yaml: no settings for method 'lp'",
        ),
    ],
)
def test_bad_requests_are_one_line(phantom_dir, tiny_checkpoint, tmp_path, capsys, extra, message):
    code = main(
        adapt_args(
            tiny_checkpoint,
            phantom_dir / "phantom_target.json",
            tmp_path / "x",
            write_method_configs(tmp_path / "m"),
            *extra,
        )
    )
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_empty_support_mask_and_checkpoint_without_preprocessing(phantom_dir, tiny_checkpoint, tmp_path, capsys):
    data = json.loads((phantom_dir / "phantom_target.json").read_text())
    data["root"] = str(phantom_dir / "phantom_target")
    image = data["cases"][0]["image"]
    data["cases"] = [c for c in data["cases"] if c["split"] == "test"] + [
        {"id": "blank", "image": image, "labels": {"liver": str(tmp_path / "blank.nii.gz")}}
    ]
    reference = nib.load(str(phantom_dir / "phantom_target" / image))
    nib.save(nib.Nifti1Image(np.zeros(reference.shape, np.uint8), reference.affine), str(tmp_path / "blank.nii.gz"))
    path = tmp_path / "blank.json"
    path.write_text(json.dumps(data))
    assert (
        main(
            adapt_args(
                tiny_checkpoint,
                path,
                tmp_path / "x",
                write_method_configs(tmp_path / "m"),
                "--organ",
                "liver",
                "--shots",
                "1",
                "--method",
                "lp",
            )
        )
        == 2
    )
    assert "support case 'blank': the liver mask is empty" in capsys.readouterr().err

    payload = read_checkpoint(tiny_checkpoint)
    del payload["preprocessing"]
    broken = tmp_path / "no_pre.pt"
    torch.save(payload, broken)
    assert (
        main(
            adapt_args(
                broken,
                phantom_dir / "phantom_target.json",
                tmp_path / "y",
                write_method_configs(tmp_path / "m"),
                "--organ",
                "liver",
                "--shots",
                "1",
            )
        )
        == 2
    )
    assert "checkpoint lacks preprocessing" in capsys.readouterr().err


@pytest.fixture(scope="module")
def swin_checkpoint(tmp_path_factory):
    """A random SwinUNETR-12 checkpoint whose roi (64x64x32) suits the transformer's size constraints."""
    from fsseg.checkpoint import save_checkpoint
    from fsseg.models import create_model
    from fsseg.preprocessing import Preprocessing
    from fsseg.templates import load_template

    template = load_template()
    torch.manual_seed(0)
    model = create_model("swinunetr_tiny", num_classes=len(template))
    return save_checkpoint(
        tmp_path_factory.mktemp("swin") / "swin.pt",
        {
            "arch": model.arch,
            "template": template.to_dict(),
            "state_dict": model.state_dict(),
            "preprocessing": Preprocessing(spacing=(4.0, 4.0, 4.0), roi=(64, 64, 32)).to_dict(),
        },
    )


@pytest.mark.parametrize("method", ["lora", "bias", "scratch"])
def test_transformer_methods_train_their_own_parameters(phantom_dir, swin_checkpoint, tmp_path, method):
    config = AdaptConfig(
        checkpoint=str(swin_checkpoint),
        data_list=str(phantom_dir / "phantom_target.json"),
        organs=["liver"],
        shots=[1],
        methods=[method],
        seeds=1,
    )
    run = Adaptation(config, tmp_path, torch.device("cpu"))
    supports = [run.support(run.pool[0])]
    torch.manual_seed(0)
    adapted = adapt_model(run.base, run.template, ["liver"], method)
    before = {n: p.detach().clone() for n, p in adapted.named_parameters() if p.requires_grad and "head" not in n}
    loss_before = fixed_crop_loss(adapted, supports, run, crops=2)
    train(adapted, supports, run, TrainingConfig(lr=3e-2, epochs=6, crops_per_volume=1, steps_per_epoch=None), seed=0)
    assert fixed_crop_loss(adapted, supports, run, crops=2) < loss_before
    after = dict(adapted.named_parameters())
    assert sum(not torch.equal(value, after[name]) for name, value in before.items()) > 0.9 * len(before)


def test_a_sweep_run_in_parts_and_merged_equals_one_run_of_the_whole(
    phantom_dir, tiny_checkpoint, tmp_path, capsys, feature_cache
):
    configs = write_method_configs(tmp_path / "configs", epochs=1)
    sweep = ["--organ", "liver", "--shots", "1", "2", "--method", "lp", "adapter", "--seeds", "1"]
    data = phantom_dir / "phantom_target.json"
    assert main(adapt_args(tiny_checkpoint, data, tmp_path / "whole", configs, *sweep, cache=feature_cache)) == 0
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        assert (
            main(
                adapt_args(
                    tiny_checkpoint,
                    data,
                    part,
                    configs,
                    *sweep,
                    "--num-parts",
                    "2",
                    "--part-id",
                    str(i),
                    cache=feature_cache,
                )
            )
            == 0
        )
    assert [sorted({(r["method"], int(r["shots"])) for r in read_rows(p)}) for p in parts] == [
        [("lp", 1), ("lp", 2)],
        [("adapter", 1), ("adapter", 2)],
    ]
    capsys.readouterr()
    assert main(["--merge", str(parts[0]), "--out", str(tmp_path / "merged")]) == 2
    assert "2 run(s) of the sweep are in no part: adapter K=1 seed 0, adapter K=2 seed 0" in capsys.readouterr().err
    assert main(["--merge", *map(str, parts + parts[:1]), "--out", str(tmp_path / "merged")]) == 2
    assert "is in both" in capsys.readouterr().err
    # malformed parts are one line, not a traceback
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((parts[0] / "config.yaml").read_text())
    foreign = json.loads((parts[1] / "results.json").read_text())
    foreign["rows"] = [{**foreign["rows"][0], "method": "scratch", "shots": 9}]
    for results, message in (
        ("{}", "holds no list of rows"),
        ('{"rows": [{"method": "lp"}]}', "holds no list of rows"),
        (json.dumps(foreign), "scratch K=9 seed 0, which is not a run of the sweep"),
    ):
        (broken / "results.json").write_text(results)
        capsys.readouterr()
        assert main(["--merge", str(parts[0]), str(broken), "--out", str(tmp_path / "merged_broken")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    # a foreign file, and a stale adapter of a run the other part owns, never enter the merged sweep
    (parts[0] / "adapters" / "foreign.safetensors").write_bytes(b"not an adapter of this sweep")
    lp = (parts[0] / "adapters" / "liver_lp_k2_s0.safetensors").read_bytes()
    (parts[1] / "adapters" / "liver_lp_k2_s0.safetensors").write_bytes(b"stale")
    assert main(["--merge", *map(str, parts), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "adapters" / "liver_lp_k2_s0.safetensors").read_bytes() == lp
    timing = ("train_seconds",)

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in timing} for r in rows]

    assert strip(read_rows(tmp_path / "merged")) == strip(read_rows(tmp_path / "whole"))
    merged, whole = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("merged", "whole"))
    assert merged["table"] == whole["table"] and merged["best"]["method"] == whole["best"]["method"]
    assert sorted(p.name for p in (tmp_path / "merged" / "adapters").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole" / "adapters").iterdir()
    )
