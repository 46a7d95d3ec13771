"""The one rule for ids from outside, and the message ids built from them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monolith.common.errors import InvalidArgument
from monolith.streams.ids import (
    ACTION,
    IMPRESSION,
    MAX_ID_BYTES,
    SAMPLE,
    MessageKey,
    action_message_id,
    check_id,
    first_id_problem,
    id_problem,
    impression_message_id,
    parse_message_id,
    sample_message_id,
)

# Every character class an id may hold, the separators of message ids and '%' among them.
valid_ids = st.text(
    st.characters(exclude_categories=("Cc", "Cs")) | st.sampled_from("/%+ .~-_"), min_size=1, max_size=40
).filter(lambda v: len(v.encode("utf-8")) <= MAX_ID_BYTES)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "is required"),
        ("a\r\nb", "control characters are not allowed (U+000D at character 1)"),
        ("\x00", "(U+0000 at character 0)"),
        ("a\tb", "(U+0009"),
        ("a\x7f", "(U+007F"),
        ("a\x9f", "(U+009F"),
        ("x" * (MAX_ID_BYTES + 1), f"{MAX_ID_BYTES + 1} bytes; at most {MAX_ID_BYTES}"),
        ("€" * 86, "258 bytes"),  # the limit is on bytes, not characters
        ("\ud800", "must be valid UTF-8"),
        (b"\xff", "must be valid UTF-8 (invalid start byte at byte 0)"),
    ],
)
def test_ids_that_break_the_rule_say_what_is_wrong(value: str | bytes, problem: str) -> None:
    found = id_problem(value)
    assert found is not None and problem in found
    with pytest.raises(InvalidArgument) as raised:
        check_id("actions[3].item_id", value)
    assert str(raised.value).startswith("actions[3].item_id: ") and problem in str(raised.value)


def test_ids_within_the_rule_pass_and_come_back_as_text() -> None:
    for value in ["r-1", "Zürich", "a/b c%d", "x" * MAX_ID_BYTES, "日本" * 42, "\u2028 is no Cc"]:
        assert id_problem(value) is None
        assert check_id("request_id", value) == value
    assert check_id("request_id", "Zürich".encode()) == "Zürich"
    assert check_id("request_id", "", required=False) == ""
    assert id_problem("", required=False) is None


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.text(max_size=8) | st.sampled_from(["", "x" * 257, "é" * 129, "ok"]), max_size=12))
def test_a_batch_is_checked_by_the_same_rule_as_each_id(values: list[str]) -> None:
    each = [(i, p) for i, v in enumerate(values) if (p := id_problem(v, required=False)) is not None]
    assert first_id_problem(values) == (each[0] if each else None)


def test_a_long_control_id_is_echoed_shortened() -> None:
    with pytest.raises(InvalidArgument) as raised:
        check_id("request_id", "\n" + "x" * 250)
    assert len(str(raised.value)) < 300


def test_message_ids_keep_plain_ids_readable_and_encode_the_rest() -> None:
    assert impression_message_id("req-1", "242") == "imp/req-1/242"
    assert action_message_id("many", "302", "click") == "act/many/302/click"
    assert sample_message_id("r", "i") == "smp/r/i"
    assert impression_message_id("a/b", "c") != impression_message_id("a", "b/c")
    assert impression_message_id("Zürich 1", "x%") == "imp/Z%C3%BCrich%201/x%25"


def test_message_ids_refuse_ids_that_break_the_rule() -> None:
    with pytest.raises(InvalidArgument, match="control characters"):
        sample_message_id("r\r\n", "i")
    with pytest.raises(InvalidArgument, match="is required"):
        impression_message_id("r", "")


def test_ids_of_other_producers_parse_to_nothing() -> None:
    for other in ["", "imp", "imp/a", "imp/a/b/c", "act/a/b", "x/a/b", "imp#0123", "smp/%ff/x"]:
        assert parse_message_id(other) is None, other


@settings(max_examples=300, deadline=None)
@given(first=st.tuples(valid_ids, valid_ids), second=st.tuples(valid_ids, valid_ids), kind=valid_ids)
def test_distinct_keys_have_distinct_ascii_message_ids_that_parse_back(
    first: tuple[str, str], second: tuple[str, str], kind: str
) -> None:
    for key in (first, second):
        built = {
            IMPRESSION: impression_message_id(*key),
            SAMPLE: sample_message_id(*key),
            ACTION: action_message_id(*key, kind),
        }
        for message_kind, message_id in built.items():
            assert message_id.isascii() and message_id.isprintable()
            assert parse_message_id(message_id) == MessageKey(message_kind, *key, kind if message_kind == ACTION else "")
    assert (impression_message_id(*first) == impression_message_id(*second)) == (first == second)
    assert (sample_message_id(*first) == sample_message_id(*second)) == (first == second)
