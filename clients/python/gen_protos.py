"""Compiles the client's protos into monolith_client/_proto/ (run by the package's build and by
the repository's `make protos`; generated code is never committed).

Two files, messages only (the client calls its three methods by path, with no generated stubs):
- `tf_serving_pb2`: from protos/monolith_client/tf_serving.proto, TF Serving's Predict and
  GetModelMetadata messages declared for the wire;
- `joiner_pb2`: from the repository's protos/monolith/api/joiner/v1/joiner.proto, the
  sample-joiner's API, compiled under its own file name: loaded beside the server package's
  copy in one process, the two are one file to protobuf.

Needs grpcio-tools (a build requirement). Run as a script: `python clients/python/gen_protos.py`.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "monolith_client" / "_proto"
# (include root, the .proto under it, the module it becomes in OUT)
SOURCES = (
    (HERE / "protos", "monolith_client/tf_serving.proto", "tf_serving_pb2.py"),
    (HERE.parent.parent / "protos", "monolith/api/joiner/v1/joiner.proto", "joiner_pb2.py"),
)


def generate() -> None:
    """Writes the modules into monolith_client/_proto/.

    Raises:
        SystemExit: a source is missing (the client builds from a checkout of the repository,
            which holds the joiner's proto) or protoc failed.
    """
    import grpc_tools
    from grpc_tools import protoc

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for root, proto, module in SOURCES:
            if not (root / proto).is_file():
                raise SystemExit(f"{root / proto} not found: build monolith-client from a checkout of the repository")
            if protoc.main(["protoc", f"-I{root}", f"-I{well_known}", f"--python_out={scratch}", str(root / proto)]) != 0:
                raise SystemExit(f"protoc failed on {root / proto}")
            shutil.move(pathlib.Path(scratch) / proto.replace(".proto", "_pb2.py"), OUT / module)
    (OUT / "__init__.py").touch()


if __name__ == "__main__":
    generate()
    sys.exit(0)
