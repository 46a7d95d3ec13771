"""The start-up filter drops TensorFlow's pre-initialisation lines and keeps everything else."""

from __future__ import annotations

import os
import sys

import pytest

from monolith.common.tf_startup import is_startup_noise, quiet_tensorflow_startup

# Lines TensorFlow 2.21 prints on a machine without a GPU, as captured from `import tensorflow`
# and the first device scan.
BANNER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
ONEDNN = (b"I0000 00:00:1795991134.580864    4568 port.cc:153] oneDNN custom operations are on. You may see "
          b"slightly different numerical results due to floating-point round-off errors.\n")  # fmt: skip
CUDART = b"I0000 00:00:1795991134.581841    4568 cudart_stub.cc:31] Could not find cuda drivers on your machine.\n"
CPU = b"I0000 00:00:1795991135.1    4568 cpu_feature_guard.cc:210] This TensorFlow binary is optimized to use AVX2\n"
CUINIT = (b"E0000 00:00:1795991146.174808    4648 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
          b"CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n")  # fmt: skip
WARNING = b"W1129 22:28:39.798000    4568 op_kernel.cc:1857] a native warning\n"
OTHER_ERROR = b"E1129 22:28:39.798000    4568 session.cc:12] a real native error\n"
PYTHON = b"Traceback (most recent call last):\n"


@pytest.mark.parametrize("line", [BANNER, ONEDNN, CUDART, CPU, CUINIT])
def test_start_up_lines_are_noise_at_the_default_level(line: bytes) -> None:
    assert is_startup_noise(line, level=2)


@pytest.mark.parametrize("line", [OTHER_ERROR, PYTHON, b"2026-11-29 22:28:39,798 INFO monolith.server: up\n"])
def test_other_lines_are_kept(line: bytes) -> None:
    assert not is_startup_noise(line, level=2)


def test_the_level_decides_like_tf_cpp_min_log_level() -> None:
    assert not is_startup_noise(WARNING, level=1) and is_startup_noise(WARNING, level=2)
    assert is_startup_noise(ONEDNN, level=1)
    for line in (BANNER, ONEDNN, CUINIT, WARNING):
        assert not is_startup_noise(line, level=0)  # an operator asking for everything gets everything


def test_the_window_filters_file_descriptor_2_and_keeps_the_order(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    # As in a `monolith` process (pytest's capture bypasses the descriptor): a buffered
    # sys.stderr over descriptor 2, which the window must flush into the capture.
    stderr = os.fdopen(2, "w", closefd=False)
    monkeypatch.setattr(sys, "stderr", stderr)
    with quiet_tensorflow_startup():
        # Native code writes to the descriptor, Python through sys.stderr: both are filtered.
        for line in (BANNER, ONEDNN, b"first\n", CUINIT, OTHER_ERROR):
            os.write(2, line)
        print("second", file=sys.stderr)
    os.write(2, b"after\n")
    stderr.close()

    assert capfd.readouterr().err == f"first\n{OTHER_ERROR.decode()}second\nafter\n"


def test_an_exception_in_the_window_still_restores_stderr_and_shows_what_was_written(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    with pytest.raises(ImportError), quiet_tensorflow_startup():
        os.write(2, CUDART + b"the reason\n")
        raise ImportError("broken")
    os.write(2, b"after\n")

    assert capfd.readouterr().err == "the reason\nafter\n"
