"""The readers-writer lock: turns alternate, so neither side starves the other."""

from __future__ import annotations

import threading

from helpers.waiting import wait_for
from monolith.embedding.concurrency import ReadWriteLock

DEADLINE = 30.0


def test_readers_share_the_lock() -> None:
    lock = ReadWriteLock()
    inside = threading.Barrier(3, timeout=DEADLINE)

    def reader() -> None:
        with lock.read():
            inside.wait()  # all three readers hold the lock at once

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    reader()
    for t in threads:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads)


def test_a_waiting_writer_blocks_new_readers() -> None:
    lock = ReadWriteLock()
    order: list[str] = []
    with lock.read():
        def write() -> None:
            with lock.write():
                order.append("writer")

        writer = threading.Thread(target=write)
        writer.start()
        wait_for(lambda: lock.waiting_writers == 1, "the writer to queue", timeout=DEADLINE, interval=0.001)

        def read() -> None:
            with lock.read():
                order.append("late reader")

        reader = threading.Thread(target=read)
        reader.start()
        wait_for(lambda: lock.waiting_readers == 1, "the reader to queue", timeout=DEADLINE, interval=0.001)
    writer.join(DEADLINE)
    reader.join(DEADLINE)

    assert order == ["writer", "late reader"]


def test_a_reader_waiting_when_a_writer_finishes_goes_before_its_next_turn() -> None:
    """A writer that takes the lock again at once (an expiry sweep, window after window)
    must let the readers that waited for it in first."""
    lock = ReadWriteLock()
    order: list[str] = []

    def read() -> None:
        with lock.read():
            order.append("reader")

    reader = threading.Thread(target=read)
    with lock.write():
        order.append("write 1")
        reader.start()
        wait_for(lambda: lock.waiting_readers == 1, "the reader to queue", timeout=DEADLINE, interval=0.001)
    with lock.write():
        order.append("write 2")
    reader.join(DEADLINE)

    assert order == ["write 1", "reader", "write 2"]
