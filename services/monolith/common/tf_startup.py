"""Keeps TensorFlow's start-up lines off stderr, honouring TF_CPP_MIN_LOG_LEVEL.

Importing TensorFlow prints lines from C++ before its logging is initialised, so
TF_CPP_MIN_LOG_LEVEL cannot stop them: absl's "All log messages before
absl::InitializeLog() is called are written to STDERR" banner, then INFO lines such as
oneDNN's "custom operations are on", "Could not find cuda drivers" and the CPU-feature
notes (once per TensorFlow library that carries its own copy of absl). Its first device
scan then logs "failed call to cuInit" as an ERROR on every machine without a GPU, which
is every machine this project runs on. None of it is about the command that was run, and
it buries that command's own output.

`quiet_tensorflow_startup()` points file descriptor 2 at a temporary file while the code
that first imports TensorFlow runs, makes the device scan happen inside that window, and
then writes back every captured line except the start-up ones: INFO and WARNING lines
below the minimum level (what TF_CPP_MIN_LOG_LEVEL would have dropped had logging been
initialised) and the no-GPU errors. Anything else, including Python tracebacks and
warnings, is written back unchanged and in order.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

_BANNER = re.compile(rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*$")
# absl/glog's prefix: severity letter, MMDD, time, thread id, file:line]. Before logging is
# initialised the date prints as 0000 and the time as 00:00:<seconds since the epoch>.
_NATIVE_LINE = re.compile(rb"^([IWEF])\d{4} [\d:.]+\s+\d+ [\w.\-/]+:\d+\] ")
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}
# ERROR lines that only say this machine has no GPU (or that CUDA plugins registered twice).
_NO_GPU_ERROR = re.compile(rb"cuInit|CUDA_ERROR_NO_DEVICE|Unable to register cu(DNN|FFT|BLAS) factory")


def min_log_level() -> int:
    """TF_CPP_MIN_LOG_LEVEL as an int (0 when unset or not a number, as TensorFlow reads it)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def is_startup_noise(line: bytes, level: int) -> bool:
    """Whether a captured stderr line is TensorFlow start-up output that `level` hides.

    Args:
        line: one line as written to file descriptor 2.
        level: the minimum log level (TF_CPP_MIN_LOG_LEVEL): 1 hides INFO, 2 also WARNING.
    """
    if level < 1:
        return False
    if _BANNER.match(line):
        return True
    native = _NATIVE_LINE.match(line)
    if native is None:
        return False
    severity = _SEVERITY[native.group(1)]
    return severity < level or (severity == 2 and _NO_GPU_ERROR.search(line) is not None)


@contextlib.contextmanager
def quiet_tensorflow_startup() -> Iterator[None]:
    """Runs the body with TensorFlow's start-up lines filtered out of stderr.

    Wrap the code that imports TensorFlow for the first time (a role's module). If the
    body imported TensorFlow, the device scan runs before the window closes, so its cuInit
    error is filtered too rather than printed at the first operation. With
    TF_CPP_MIN_LOG_LEVEL=0 (an operator asking for everything) nothing is filtered.
    """
    level = min_log_level()
    if level < 1:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
            tf = sys.modules.get("tensorflow")
            if tf is not None and hasattr(tf, "config"):
                tf.config.list_physical_devices()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = memoryview(b"".join(line for line in captured if not is_startup_noise(line, level)))
            while kept:
                kept = kept[os.write(2, kept):]
