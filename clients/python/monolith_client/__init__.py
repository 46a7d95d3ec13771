"""A light Python client for monolith: score candidates (TF Serving's Predict API) and report
what users did (the sample-joiner's ReportActions API). Needs grpcio, protobuf and numpy only.

    from monolith_client import MonolithClient

    with MonolithClient("127.0.0.1:8500", joiner_address="127.0.0.1:8600") as client:
        scores = client.score(
            user={"user_id": 196, "age": 49, "gender": "M", "occupation": "writer", "zip": "554"},
            candidates={"movie_id": [242, 302, 377], "genres": [["Comedy"], ["Crime", "Drama"], ["Action"]]},
            request_id="req-1",  # serving logs the three candidates as impressions under it
        )
        client.report_action("req-1", item_id=302, kind="click")  # 302 becomes a positive sample

Candidates of a call with a request_id that get no positive action become negative samples
when the joiner's window closes. Scoring alone needs neither a request_id nor a joiner.
`AsyncMonolithClient` (monolith_client.aio) is the same client for asyncio.
"""

from typing import Any

from monolith_client.client import ClientSettings, MonolithClient
from monolith_client.errors import ActionError, MonolithClientError, PredictError
from monolith_client.messages import ActionLike


def __getattr__(name: str) -> Any:
    # asyncio and grpc.aio load with the first use of the asyncio client, not with every import.
    if name == "AsyncMonolithClient":
        from monolith_client.aio import AsyncMonolithClient

        return AsyncMonolithClient
    raise AttributeError(f"module 'monolith_client' has no attribute {name!r}")


__all__ = ["ActionError", "ActionLike", "AsyncMonolithClient", "ClientSettings", "MonolithClient",
           "MonolithClientError", "PredictError"]  # fmt: skip
