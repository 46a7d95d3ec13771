"""Parameter servers as local processes, for the benchmarks that need a cluster."""

from __future__ import annotations

import os

from monolith.common.process import RoleProcess, start_role, wait_healthy


def start_parameter_servers(
    config_path: str, workdir: str, procs: list[RoleProcess], tag: str
) -> tuple[list[str], str]:
    """2 training embedding-PS shards and a dense-PS; returns their addresses once healthy."""
    ps = []
    for shard in range(2):
        proc, address = start_role(
            ["embedding-ps", "--shard", str(shard), "--num-shards", "2", "--config", config_path],
            os.path.join(workdir, f"{tag}-ps{shard}.log"),
        )
        procs.append(proc)
        ps.append(address)
    proc, dense_address = start_role(["dense-ps", "--config", config_path], os.path.join(workdir, f"{tag}-dense.log"))
    procs.append(proc)
    for address in (*ps, dense_address):
        wait_healthy(address)
    return ps, dense_address
