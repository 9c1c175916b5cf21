"""Spec strings: parsing, canonical text, information bits, and errors that name no config key."""

import pytest

from fedml_progfed.comm.codecs import CompressionSpec, SpecError, information_bits, parse_spec, valid_forms
from fedml_progfed.comm.codecs.spec import SPEC_PARTS, register_part


def test_spec_parsing_and_canonical_text():
    assert parse_spec("lq8+sp25") == CompressionSpec(bits=8, sparsifier="random", keep_percent=25)
    assert parse_spec(" SP25 + lq8 ").text == "lq8+sp25"
    assert parse_spec("lq4+topk10+ef").error_feedback
    assert parse_spec("ef+rot+lq2").text == "lq2+rot+ef"
    assert parse_spec("float").lossless and parse_spec("float").text == "float"
    assert str(parse_spec("topk5+lq4")) == "lq4+topk5"
    assert CompressionSpec().text == "float"
    assert information_bits("float", 10) == 320
    assert information_bits("lq8+sp25", 1000) == 8 * 250
    assert information_bits("lq2+rot", 1000) == 2000  # rotation adds no information
    assert information_bits(parse_spec("sp10"), 7) == 32  # ceil(0.1 * 7) = 1 kept


def test_kept_uses_integer_ceiling():
    assert parse_spec("sp10").kept(1000) == 100  # not 101 from 0.1 * 1000 = 100.00000000000001
    assert parse_spec("sp10").kept(1) == 1 and parse_spec("sp10").kept(0) == 0
    assert parse_spec("lq8").kept(17) == 17


@pytest.mark.parametrize(
    "text, words",
    [
        ("lq3", ["unknown compression part 'lq3'", "lq8 | lq4 | lq2", "sp<1-99>"]),
        ("qsgd", ["unknown compression part 'qsgd'"]),
        ("sp100", ["unknown compression part 'sp100'"]),
        ("lq8+lq4", ["two values parts"]),
        ("sp25+topk10", ["two sparsifier parts"]),
        ("rot", ["needs lq8, lq4 or lq2"]),
        ("float+ef", ["'ef' needs a lossy part"]),
        ("", ["expected a compression spec string"]),
        (None, ["expected a compression spec string"]),
    ],
)
def test_bad_specs_explain_the_problem_without_a_config_key(text, words):
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for word in words:
        assert word in message
    assert "valid: parts float" in message  # every error lists the valid forms
    # the config layer adds the key; this layer must not know it
    assert "progfed_args" not in message and "compression_up" not in message and "compression_down" not in message


def test_valid_forms_list_every_registered_part_in_registration_order():
    forms = valid_forms()
    assert forms.startswith("parts float, lq8 | lq4 | lq2, rot, sp<1-99>, topk<1-99>, ef joined by '+'")
    assert len(SPEC_PARTS) == 6


def test_a_part_registered_twice_or_in_an_unknown_slot_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register_part("ef", r"ef2", "memory", lambda m: {}, lambda s: "")
    with pytest.raises(ValueError, match="slot 'colour'"):
        register_part("paint", r"paint", "colour", lambda m: {}, lambda s: "")
