"""`monolith checkpoint list|verify` on storage: clear one-line errors and non-zero exits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from monolith.checkpoint.store import CheckpointStore
from monolith.cli import main
from monolith.embedding.table import RowBatch


def write_checkpoint(root: Path) -> str:
    store = CheckpointStore(str(root))
    writer = store.begin("full", 1)
    with writer.shard(0, "incarnation") as out:
        out.write("user", RowBatch(np.arange(3, dtype=np.int64), np.ones((3, 2), np.float32),
                                   np.zeros(3, np.uint32)), np.zeros(0, np.int64))  # fmt: skip
        out.version = 5
    return writer.commit().id


def test_list_and_verify_a_good_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = write_checkpoint(tmp_path)
    assert main(["checkpoint", "list", "--storage", str(tmp_path)]) == 0
    assert checkpoint in capsys.readouterr().out
    assert main(["checkpoint", "verify", "--storage", str(tmp_path)]) == 0
    assert f"{checkpoint}: chain of 1 verified" in capsys.readouterr().out


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "manifest.json").write_text("{"), "the manifest is not valid JSON"),
        (lambda d: (d / "manifest.json").unlink(), "no checkpoint in"),
        (lambda d: (d / "shard-00000.rows").write_bytes(b"MNLTROW1"), "has 8 bytes, the manifest says"),
        (lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text().replace(
            '"num_shards": 1', '"num_shards": 2')), "expected one entry per shard 0..1"),  # fmt: skip
    ],
)
def test_damaged_checkpoints_exit_non_zero_with_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage, message: str  # type: ignore[no-untyped-def]
) -> None:
    checkpoint = write_checkpoint(tmp_path)
    damage(tmp_path / checkpoint)
    assert main(["checkpoint", "verify", "--storage", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert message in err and err.startswith("monolith checkpoint:") and "Traceback" not in err


def test_unreachable_storage_exits_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["checkpoint", "list", "--storage", str(blocker / "checkpoints")]) != 0
    err = capsys.readouterr().err
    assert "checkpoint storage" in err and "Traceback" not in err
