import pytest
from pydantic import Field

from mass.config import MassConfig, apply_overrides, load_config, parse_overrides
from mass.errors import ConfigError


class Inner(MassConfig):
    depth: int = Field(1, ge=1)
    name: str = "x"


class Outer(MassConfig):
    title: str
    inner: Inner = Field(default_factory=Inner)
    tags: list[str] = Field(default_factory=list)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_plus_overrides(tmp_path):
    path = write(tmp_path, "title: t\ninner: {depth: 2}\n")
    cfg = load_config(Outer, path, ["inner.depth=5", "inner.name=hello", "tags=[a, b]"])
    assert cfg.inner.depth == 5 and cfg.inner.name == "hello" and cfg.tags == ["a", "b"]


def test_override_values_are_yaml_scalars():
    assert parse_overrides(["a.b=3", "c=true", "d=hello world", "e="]) == [
        (["a", "b"], 3), (["c"], True), (["d"], "hello world"), (["e"], None)]


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError, match="bad override"):
        parse_overrides([bad])


def test_override_through_a_scalar_names_the_key():
    with pytest.raises(ConfigError, match="title is not a mapping"):
        apply_overrides({"title": "t"}, ["title.x=1"])


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "title: t\ninner:\n  depth: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(Outer, path)
    assert "malformed YAML" in str(info.value) and "line" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_names_the_field(tmp_path):
    path = write(tmp_path, "title: t\ninner: {depht: 2}\n")
    with pytest.raises(ConfigError) as info:
        load_config(Outer, path)
    assert "inner.depht" in str(info.value) and "unknown key" in str(info.value)
    assert info.value.details["field"] == "inner.depht"


def test_unknown_override_key_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="inner.nope"):
        load_config(Outer, write(tmp_path, "title: t\n"), ["inner.nope=1"])


def test_wrong_type_names_the_field(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(Outer, write(tmp_path, "title: t\ninner: {depth: deep}\n"))
    assert "inner.depth" in str(info.value) and "integer" in str(info.value)


def test_constraint_violation_and_missing_field(tmp_path):
    with pytest.raises(ConfigError, match="inner.depth.*greater than or equal to 1"):
        load_config(Outer, write(tmp_path, "title: t\ninner: {depth: 0}\n"))
    with pytest.raises(ConfigError, match="title: Field required"):
        load_config(Outer, write(tmp_path, "inner: {depth: 2}\n"))


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, write(tmp_path, "- a\n- b\n"))
