"""Failpoints: a process dies at a named step, for tests that must crash it at an exact point.

A test that kills a process from outside cannot choose the step it dies at: on a loaded machine
the process may run to the end of what the test wanted to interrupt between two of its reads.
A failpoint moves the choice into the process. `MONOLITH_FAILPOINTS="joiner.round_published=3"`
makes the third `failpoint("joiner.round_published")` this process reaches SIGKILL it, exactly as
`kill -9` from outside would: no handler runs, nothing is flushed, whatever is in flight is lost.

Unset (always, outside tests), a failpoint costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "MONOLITH_FAILPOINTS"


def _parse(spec: str) -> dict[str, int]:
    """"name=n,other=m" -> {name: n, other: m}; a malformed spec is an error at import, not ignored."""
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, hits = item.partition("=")
        if not sep or not name or not hits.isdigit() or int(hits) < 1:
            raise ValueError(f"{ENV}: {item!r} is not name=<hits, at least 1>")
        armed[name] = int(hits)
    return armed


_ARMED = _parse(os.environ.get(ENV, ""))
_LOCK = threading.Lock()


def failpoint(name: str) -> None:
    """SIGKILLs this process the n-th time it reaches `name`, if `MONOLITH_FAILPOINTS` arms it."""
    if name not in _ARMED:
        return
    with _LOCK:
        _ARMED[name] -= 1
        if _ARMED[name] == 0:
            os.kill(os.getpid(), signal.SIGKILL)


def environment(hits: dict[str, int]) -> dict[str, str]:
    """The environment entry that arms failpoints in a child process: {name: hits}."""
    return {ENV: ",".join(f"{name}={n}" for name, n in hits.items())}
