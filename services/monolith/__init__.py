"""monolith: real-time recommendation with a collisionless embedding table."""

import hashlib
import os

# TensorFlow's C++ INFO and WARNING lines (CPU features, no CUDA) drown the services' own
# logs; an operator can still ask for them by setting the variable. It must be set before
# TensorFlow is first imported, hence here. The lines TensorFlow prints before its logging
# reads it are filtered by `monolith.common.tf_startup`, at the same level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# gRPC's EventEngine (on for Python since grpcio 1.80) moves every call's socket work to
# its own threads, so each unary call of our synchronous servers and clients crosses
# threads a few more times. With the calling thread polling instead (these experiments
# off), a loopback call costs ~30% less CPU on the client and ~25% less on the server
# (measured with grpcio 1.85.1), and a Predict over 2 embedding-PS shards ~8% less in
# total. gRPC reads the variable once, when it is first imported, hence here; setting
# GRPC_EXPERIMENTS yourself overrides it. (These experiments are due to be removed in a
# later grpcio; the variable is then ignored and gRPC simply uses its EventEngine.)
os.environ.setdefault(
    "GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"
)


def _numba_cache_dir() -> str:
    """Where numba keeps compiled kernels: a directory per version of the kernels' sources.

    numba's own cache sits next to each source file and is invalidated only when that file
    changes. A kernel that inlines one from another module (table_kernels calls row_math)
    would keep running a stale copy after only the other module changed, with no sign of
    it. Keying the directory by every kernel module's source rules that out.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.blake2b(digest_size=8)
    for package in ("embedding", "embedding_ps", os.path.join("harness", "bench")):
        directory = os.path.join(here, package)
        for name in sorted(os.listdir(directory)):
            if name.endswith(".py"):
                digest.update(name.encode())
                with open(os.path.join(directory, name), "rb") as f:
                    digest.update(f.read())
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "monolith", "numba", digest.hexdigest())


# numba reads the variable when it is first imported, hence here; the image sets its own.
os.environ.setdefault("NUMBA_CACHE_DIR", _numba_cache_dir())
