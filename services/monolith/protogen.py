"""Generates Python code from protos/ (run by `make protos`).

The proto package path equals the Python import path (`monolith.api.<service>.v1`), so
the generated imports resolve as they are, with no rewriting.
"""

from __future__ import annotations

import pathlib
import sys

import grpc_tools
from grpc_tools import protoc


def generate(proto_root: pathlib.Path, out_root: pathlib.Path) -> None:
    """Compiles every .proto under proto_root into out_root, with __init__.py files."""
    protos = sorted(str(p) for p in proto_root.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {proto_root}")
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for proto in protos:
        package_dir = (out_root / pathlib.Path(proto).relative_to(proto_root)).parent
        while package_dir != out_root / "monolith":
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
