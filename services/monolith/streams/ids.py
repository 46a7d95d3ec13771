"""Ids from outside, and the message ids built from them: one rule, one format.

A request_id or an item_id comes from a product backend (Predict, ReportActions) and ends
up in stream headers (`Nats-Msg-Id`), in the joiner's keys and in samples. So every such
id passes one rule before anything stores it (`check_id`, `id_problem`): at most
`MAX_ID_BYTES` bytes of valid UTF-8 and no control characters (Unicode category Cc: C0,
DEL, C1), which could end a header line early or be silently mangled on the way.

Message ids (JetStream drops a message whose id it saw within the duplicate window) are
`<kind>/<part>/<part>[/<part>]`, each part percent-encoded (RFC 3986 unreserved characters
kept, every other byte of its UTF-8 as `%XX`). So a message id is ASCII, at most
`3 * MAX_ID_BYTES` bytes per part, and names exactly one key: no part holds a `/`, so
`imp/a%2Fb/c` (request "a/b", item "c") and `imp/a/b%2Fc` (request "a", item "b/c") differ,
where the bare ids would both read `imp/a/b/c` and the second message would be dropped as
a duplicate of the first. `parse_message_id` reads the parts back. Ids made only of
unreserved characters (`req-1`, `242`) read the same encoded, so those message ids are
unchanged from earlier releases.
"""

from __future__ import annotations

import functools
import hashlib
import re
import urllib.parse
from collections.abc import Sequence
from typing import NamedTuple

from monolith.common.errors import InvalidArgument, shorten

MAX_ID_BYTES = 256

IMPRESSION, ACTION, SAMPLE, IMPRESSIONS = "imp", "act", "smp", "imps"
_PARTS = {IMPRESSION: 2, ACTION: 3, SAMPLE: 2, IMPRESSIONS: 2}  # parts after the kind
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc, exactly


def id_problem(value: str | bytes, required: bool = True) -> str | None:
    """What is wrong with an id from outside, or None if it passes the rule.

    Args:
        value: the id as text, or as the bytes a string tensor carries.
        required: whether an empty id is wrong (where "" means "none", it is not).
    """
    if not value:
        return "is required" if required else None
    if isinstance(value, bytes):
        try:
            text, size = value.decode("utf-8"), len(value)
        except UnicodeDecodeError as exc:
            return f"must be valid UTF-8 ({exc.reason} at byte {exc.start}), got {shorten(repr(value))}"
    else:
        text = value
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:  # a lone surrogate: no UTF-8 holds it
            return f"must be valid UTF-8 ({exc.reason} at character {exc.start}), got {shorten(repr(value))}"
    if size > MAX_ID_BYTES:
        return f"{size} bytes; at most {MAX_ID_BYTES}"
    found = _CONTROL.search(text)
    if found is not None:
        return (
            f"control characters are not allowed (U+{ord(found.group()):04X} at character {found.start()}), "
            f"got {shorten(repr(text))}"
        )
    return None


def first_id_problem(values: Sequence[str]) -> tuple[int, str] | None:
    """The first of `values` that breaks the rule and what is wrong with it; None if none does.

    `id_problem` for a batch of text ids where "" means none (Predict checks every
    candidate): when they are all ASCII, one scan of their concatenation decides.
    """
    joined = "".join(values)
    if joined.isascii() and _CONTROL.search(joined) is None and max(map(len, values), default=0) <= MAX_ID_BYTES:
        return None
    for i, value in enumerate(values):
        problem = id_problem(value, required=False)
        if problem is not None:
            return i, problem
    return None


def check_id(what: str, value: str | bytes, required: bool = True) -> str:
    """The id as text, if it passes the rule.

    Args:
        what: the field, as the client knows it: "actions[2].item_id", "input 'request_id':
            example 3".
        value: the id.
        required: whether an empty id is refused.

    Raises:
        InvalidArgument: `<what>: <what is wrong>` (the value echoed shortened).
    """
    problem = id_problem(value, required)
    if problem is not None:
        raise InvalidArgument(f"{what}: {problem}")
    return value.decode("utf-8") if isinstance(value, bytes) else value


@functools.lru_cache(maxsize=4096)
def _part(value: str) -> str:
    """One id as a message-id part; most calls repeat their request_id, hence the cache."""
    check_id("message id part", value)
    return urllib.parse.quote(value, safe="")


def impression_message_id(request_id: str, item_id: str) -> str:
    """`imp/<request_id>/<item_id>`: model-serving logs one impression per key.

    Raises:
        InvalidArgument: an id breaks the rule (callers check ids where they arrive; this
            keeps one that slipped through out of a header).
    """
    return f"{IMPRESSION}/{_part(request_id)}/{_part(item_id)}"


def impressions_message_id(request_id: str, item_ids: Sequence[str]) -> str:
    """`imps/<request_id>/<digest>`: one Predict call's candidates, logged as one message.

    The digest (16 hex digits of BLAKE2b over the item ids, in order) names the candidate
    list: a re-publish of the same call is dropped as a duplicate, while another call that
    reuses the request_id with other candidates is a message of its own (the joiner then
    counts the keys the two share as duplicate impressions). The item ids must pass the id
    rule (checked where they arrive); the request_id is checked here.

    Raises:
        InvalidArgument: as `impression_message_id`.
    """
    digest = hashlib.blake2b(digest_size=8)
    for item_id in item_ids:
        encoded = item_id.encode("utf-8")
        digest.update(len(encoded).to_bytes(2, "little"))  # ids are at most 256 bytes: unambiguous
        digest.update(encoded)
    return f"{IMPRESSIONS}/{_part(request_id)}/{digest.hexdigest()}"


def action_message_id(request_id: str, item_id: str, kind: str) -> str:
    """`act/<request_id>/<item_id>/<kind>`: the same action reported again is stored once.

    Raises:
        InvalidArgument: as `impression_message_id`.
    """
    return f"{ACTION}/{_part(request_id)}/{_part(item_id)}/{_part(kind)}"


def sample_message_id(request_id: str, item_id: str) -> str:
    """`smp/<request_id>/<item_id>`: the joiner decides at most one sample per key.

    Raises:
        InvalidArgument: as `impression_message_id`.
    """
    return f"{SAMPLE}/{_part(request_id)}/{_part(item_id)}"


class MessageKey(NamedTuple):
    """What a message id names.

    Attributes:
        kind: IMPRESSION, ACTION or SAMPLE.
        request_id: the request.
        item_id: the candidate.
        action: the action's kind (ACTION only; "" otherwise).
    """

    kind: str
    request_id: str
    item_id: str
    action: str = ""


def parse_message_id(message_id: str) -> MessageKey | None:
    """The key a message id built here names; None for any other id (a message of another producer)."""
    kind, _, rest = message_id.partition("/")
    parts = rest.split("/")
    if _PARTS.get(kind) != len(parts):
        return None
    try:
        decoded = [urllib.parse.unquote(part, errors="strict") for part in parts]
    except UnicodeDecodeError:
        return None
    return MessageKey(kind, *decoded)
