import pytest

from infinillm import errors


def test_every_error_derives_from_the_base():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.InfiniLLMError)


def test_validation_error_is_a_value_error_naming_field_value_and_limit():
    e = errors.ValidationError("block_size", 7, "must be a power of two in [1, 1024]", owner="CacheConfig")
    assert isinstance(e, ValueError)
    assert str(e) == "CacheConfig.block_size=7 is invalid: must be a power of two in [1, 1024]"
    assert (e.field, e.value, e.owner) == ("block_size", 7, "CacheConfig")


def test_request_too_long_is_a_capacity_error_and_a_value_error():
    assert issubclass(errors.RequestTooLongError, errors.CapacityError)
    assert issubclass(errors.RequestTooLongError, ValueError)
    with pytest.raises(errors.CapacityError, match=r"needs 300 blocks, the cluster has 256"):
        raise errors.RequestTooLongError("needs 300 blocks, the cluster has 256")


def test_validation_error_copies():
    import copy

    e = errors.ValidationError("n", -1, "must be >= 0", owner="X")
    c = copy.copy(e)
    assert str(c) == str(e) and c.owner == "X"
