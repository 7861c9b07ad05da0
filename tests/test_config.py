from pathlib import Path

import pytest

from conftest import REPO
from fsseg.adapt.config import AdaptConfig, read_method_settings
from fsseg.adapters import get_method, list_methods
from fsseg.config import apply_overrides, from_dict, load_config, to_dict
from fsseg.errors import ConfigError
from fsseg.pretrain.config import PretrainConfig

METHOD_SETTINGS = sorted(p for p in (REPO / "configs" / "adapt").rglob("*.yaml") if p.stem != "default")


@pytest.mark.parametrize("name", ["tiny", "swinunetr"])
def test_shipped_configs_validate(name):
    config = load_config(PretrainConfig, REPO / "configs" / "pretrain" / f"{name}.yaml")
    assert config.preprocessing.hu_window == (-175.0, 250.0)
    assert load_config(PretrainConfig, None, []).optim.lr == 1e-4


@pytest.mark.parametrize("path", METHOD_SETTINGS, ids=lambda p: str(p.relative_to(REPO / "configs" / "adapt")))
def test_shipped_method_settings_validate_with_their_options(path):
    # The options are checked against the method's own class: a key another method takes (init_from_template
    # under affine-ln) passes read_method_settings and fails only when fsseg-adapt reaches that method.
    settings = read_method_settings(path)
    from_dict(get_method(path.stem).config_cls, settings.options, where=f"{path.name}: options")


def test_every_method_has_shipped_settings_and_the_run_config_validates():
    assert {p.stem for p in METHOD_SETTINGS if p.parent.name == "adapt"} == set(list_methods())
    load_config(AdaptConfig, REPO / "configs" / "adapt" / "default.yaml")


def test_paper_recipe_constants():
    config = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "swinunetr.yaml")
    assert config.model.name == "swinunetr" and config.preprocessing.roi == (96, 96, 96)
    assert config.optim.lr == 1e-4 and config.optim.weight_decay == 1e-5 and config.optim.warmup_epochs > 0


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("optim:\n  lrate: 0.1\n", r"unknown config key\(s\) optim.lrate; valid keys of optim: lr"),
        ("optim:\n  epochs: ten\n", "optim.epochs: expected an integer, got 'ten'"),
        ("optim:\n  epochs: 2.5\n", "optim.epochs: expected an integer"),
        ("amp: 1\n", "amp: expected true or false"),
        ("preprocessing:\n  spacing: [1, 1]\n", r"preprocessing.spacing: expected 3 values"),
        ("preprocessing:\n  hu_window: [300, 100]\n", "low < high"),
        ("data:\n  lists: data.json\n", "data.lists: expected a list"),
        ("optim:\n  lr: 0.1\n   epochs: 3\n", "invalid YAML at line"),
        ("- a\n- b\n", "expected a mapping"),
        ("optim:\n  epochs: 0\n", "optim.epochs must lie in"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, write(tmp_path, text))


def test_overrides_are_yaml_and_reach_nested_keys(tmp_path):
    config = load_config(
        PretrainConfig,
        write(tmp_path, "optim:\n  lr: 0.1\n"),
        ["optim.lr=3e-4", "model.kwargs={feature_size: 24}", "data.lists=[a.json, b.json]"],
    )
    assert config.optim.lr == 3e-4 and config.model.kwargs == {"feature_size": 24}
    assert config.data.lists == ["a.json", "b.json"]
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(PretrainConfig, None, ["optim.rl=1"])


def test_resolved_config_round_trips():
    config = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "tiny.yaml")
    from fsseg.config import from_dict

    assert from_dict(PretrainConfig, to_dict(config)) == config


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(PretrainConfig, tmp_path / "none.yaml")


def test_every_config_key_has_help_text_and_help_config_lists_it(capsys):
    from fsseg.adapt.cli import build_parser as adapt_parser
    from fsseg.adapt.cli import shipped_methods
    from fsseg.adapt.config import AdaptConfig, MethodSettings
    from fsseg.config import config_keys
    from fsseg.pretrain.cli import build_parser as pretrain_parser

    classes = [PretrainConfig, AdaptConfig, MethodSettings, *(get_method(m).config_cls for m in shipped_methods())]
    bare = [f"{cls.__name__}.{key}" for cls in classes for key, _, text in config_keys(cls) if not text.strip()]
    assert not bare, f"config keys without help text: {bare}"
    for parser, expected in (
        (pretrain_parser(), "optim.lr (default: 0.0001): "),
        (adapt_parser(), "<method>.yaml: training.lr"),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(["--help-config"])
        assert expected in capsys.readouterr().out
