"""The steering field: parsing, its canonical form, and the prefix-cache salt (no vLLM needed)."""

import pytest

from peft_steer_vllm import Steering, SteeringError, cache_salt, parse

ADAPTERS = {"power-seeking", "honest", "v2.gguf"}


def test_parse_sorts_drops_zero_terms_and_reads_numbers():
    steering = parse(" power-seeking:-2 , honest:0.5,v2.gguf:0 ", ADAPTERS)
    assert steering.terms == (("honest", 0.5), ("power-seeking", -2.0))
    assert steering.canonical() == "honest:0.5,power-seeking:-2.0"
    assert parse("honest:5e-1,power-seeking:-2.0", ADAPTERS) == steering
    assert not parse("", ADAPTERS) and not parse("honest:-0", ADAPTERS)


@pytest.mark.parametrize(
    "value, message",
    [
        ("nobody:1", "does not have (it has: honest, power-seeking, v2.gguf)"),
        ("honest", "is not NAME:MULTIPLIER"),
        ("honest:", "is not NAME:MULTIPLIER"),
        (":1", "is not NAME:MULTIPLIER"),
        ("honest:1,", "is not NAME:MULTIPLIER"),
        ("honest:x", "'x', not a number"),
        ("honest:nan", "finite number"),
        ("honest:-inf", "finite number"),
        ("honest:1e39", "float32's range"),
        ("honest:1,honest:2", "twice"),
        (2.0, "must be a string"),
        (["honest:1"], "must be a string"),
    ],
)
def test_bad_fields_name_the_problem(value, message):
    with pytest.raises(SteeringError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(value, ADAPTERS)


def test_error_messages_quote_a_bounded_part_of_the_input():
    with pytest.raises(SteeringError) as error:
        parse("x" * 100_000 + ":1", ADAPTERS)
    assert len(str(error.value)) < 300


def test_cache_salt_separates_steerings_and_keeps_the_default_unsalted():
    none, power = Steering(), parse("power-seeking:2", ADAPTERS)
    assert cache_salt(none, none) is None
    assert cache_salt(none, none, "client") == "client"
    salt = cache_salt(power, none)
    assert salt and salt == cache_salt(parse("power-seeking:2.0", ADAPTERS), none)
    assert salt != cache_salt(parse("power-seeking:-2", ADAPTERS), none)
    assert cache_salt(power, none, "client") == f"client|{salt}"
    # on a server whose default is power-seeking:2, those requests share the unsalted cache, and unsteered ones don't
    assert cache_salt(power, power) is None
    assert cache_salt(none, power) not in (None, salt)
