import pytest

from mass.errors import InvalidModelRef
from mass.refs import ModelRef


@pytest.mark.parametrize("text,name,version,alias", [
    ("tiny-gpt", "tiny-gpt", None, None),
    ("tiny-gpt/3", "tiny-gpt", 3, None),
    ("tiny-gpt@production", "tiny-gpt", None, "production"),
    ("  m.v2_x@canary ", "m.v2_x", None, "canary"),
])
def test_parse_and_print(text, name, version, alias):
    ref = ModelRef.parse(text)
    assert (ref.name, ref.version, ref.alias) == (name, version, alias)
    assert ModelRef.parse(str(ref)) == ref
    assert ref.is_latest == (version is None and alias is None)


@pytest.mark.parametrize("text,needle", [
    ("", "empty"),
    ("bad name", "illegal model name"),
    ("tiny;rm -rf", "illegal model name"),
    ("../etc/passwd", "illegal model name"),
    ("-lead", "illegal model name"),
    ("m/abc", "positive integer"),
    ("m/0", "positive integer"),
    ("m@Prod", "illegal alias"),
    ("m@latest", "reserved"),
    ("m@v3", "reserved"),
    ("m@", "illegal alias"),
    ("x" * 65, "at most 64"),
])
def test_illegal_refs_fail_with_a_message_naming_the_problem(text, needle):
    with pytest.raises(InvalidModelRef) as info:
        ModelRef.parse(text)
    assert needle in str(info.value)
    assert info.value.exit_code == 2 and info.value.http_status == 400


def test_version_and_alias_together_are_rejected():
    with pytest.raises(InvalidModelRef, match="both"):
        ModelRef("m", version=1, alias="prod")


def test_refs_are_values():
    assert ModelRef.parse("a/1") == ModelRef("a", version=1)
    assert len({ModelRef.parse("a@x"), ModelRef("a", alias="x")}) == 1
