import pickle

import pytest

from mass import errors
from mass.errors import MassError

ALL = [cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, MassError)]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_error_round_trips_through_pickle(cls):
    exc = cls("something went wrong", field="a.b", available=["x", "y"])
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert back.message == "something went wrong"
    assert back.details == {"field": "a.b", "available": ["x", "y"]}
    assert str(back) == "something went wrong"


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_codes_are_unique_and_map_back_to_the_class(cls):
    assert MassError.class_for(cls.code) is cls
    assert 400 <= cls.http_status < 600
    assert cls.exit_code >= 1


def test_codes_are_distinct():
    codes = [cls.code for cls in ALL]
    assert len(codes) == len(set(codes))


def test_unknown_code_maps_to_root_and_to_dict_has_details():
    assert MassError.class_for("no-such-code") is MassError
    exc = errors.ModelNotFound("gone", name="m")
    assert exc.to_dict() == {"code": "model_not_found", "message": "gone", "name": "m"}
    assert exc.http_status == 404 and isinstance(exc, errors.NotFound)


def test_upstream_failures_have_one_wording_for_gateway_and_sdk():
    busy = errors.Overloaded.at_capacity("minilm", 3)
    late = errors.UpstreamTimeout.after("minilm", 1.5)
    assert (busy.message, busy.details) == ("model 'minilm' is at capacity; retry in 3s", {"retry_after": 3})
    assert late.message == "model 'minilm' did not answer within 1.5s"
    back = MassError.from_dict(busy.to_dict())
    assert type(back) is errors.Overloaded and back.details["retry_after"] == 3
