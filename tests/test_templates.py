import pytest

from fsseg.errors import ConfigError
from fsseg.templates import available_templates, canonical_name, load_template


def test_default_template_is_fseft29_in_reference_order():
    template = load_template()
    assert template.name == "fseft29"
    assert len(template) == 29
    assert template.ids == tuple(range(1, 30))
    # Channel = id - 1, as in the reference code's universal template.
    assert template.channel("spleen") == 0
    assert template.channel("liver") == 5
    assert template.channel("colon_tumor") == 28


def test_aliases_resolve_to_canonical_names():
    template = load_template("fseft29")
    assert canonical_name("gall") == "gallbladder"
    assert canonical_name("LKidney") == "kidney_left"
    assert canonical_name("postcava") == "inferior_vena_cava"
    assert canonical_name("Kidney Right") == "kidney_right"
    assert template.channel("rkidney") == template.channel("kidney_right") == 1
    assert "celiac_truck" in template
    assert template.channel("heart") is None


def test_alternative_templates_ship():
    assert {"fseft29", "clip32", "totalseg117"} <= set(available_templates())
    assert len(load_template("clip32")) == 32
    assert load_template("clip32").channel("kidney_cyst") == 31
    totalseg = load_template("totalseg117")
    assert len(totalseg) == 117
    assert totalseg.channel("liver") == 4


def test_unknown_names_give_suggestions():
    with pytest.raises(ConfigError, match="available: .*fseft29"):
        load_template("fseft30")
    with pytest.raises(ConfigError, match="did you mean pancreas"):
        load_template().require_channel("pancreaz")


def test_template_file_with_duplicates_is_rejected(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"name": "bad", "structures": [{"id": 1, "name": "liver"}, {"id": 2, "name": "Liver"}]}')
    with pytest.raises(ConfigError, match="duplicate structure name"):
        load_template(path)


def test_round_trip_through_dict():
    template = load_template()
    assert type(template).from_dict(template.to_dict()).structures == template.structures


def test_group_names_expand_to_their_members():
    from fsseg.templates import expand_structures

    flare9 = expand_structures(["flare9"])
    assert len(flare9) == 9 and flare9[0] == "spleen" and "duodenum" in flare9
    assert expand_structures(["liver", "abdomen"])[:2] == ["liver", "spleen"]
    assert len(expand_structures(["abdomen", "liver"])) == 13  # repeats dropped
    assert expand_structures(["gall", "Heart"]) == ["gallbladder", "heart"]
