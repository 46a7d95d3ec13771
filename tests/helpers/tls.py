"""Test certificates: a self-signed certificate for localhost (its own CA), made with openssl."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

HAVE_OPENSSL = shutil.which("openssl") is not None


def self_signed(directory: Path) -> tuple[str, str]:
    """(certificate, key) PEM files of a new self-signed certificate for localhost, in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = str(directory / "tls.crt"), str(directory / "tls.key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key
