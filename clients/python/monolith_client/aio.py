"""The asyncio client: `MonolithClient`'s API as coroutines, on grpc.aio.

    async with AsyncMonolithClient("127.0.0.1:8500", joiner_address="127.0.0.1:8600") as client:
        scores = await client.score(user, candidates, request_id="req-1")
        await client.report_action("req-1", item_id=302)

Its channels open on first use, in the event loop that uses them; use one client per loop.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar, Union

import grpc
import grpc.aio
import numpy as np

from monolith_client import messages
from monolith_client.channel import open_aio_channel
from monolith_client.client import ClientSettings, Metadata
from monolith_client.errors import ActionError, MonolithClientError, PredictError
from monolith_client.messages import ActionLike, Method
from monolith_client.retry import Backoff, retryable

_T = TypeVar("_T")


class AsyncMonolithClient(ClientSettings):
    """`MonolithClient` for asyncio: the same arguments, methods and errors, awaited.

    Close it with `await client.close()` (or use `async with`).
    """

    def _open(self) -> None:
        self._channel: Optional[grpc.aio.Channel] = None
        self._joiner_channel: Optional[grpc.aio.Channel] = None

    async def score(self, user: Mapping[str, Any], candidates: Mapping[str, Sequence[Any]],
                    request_id: Optional[str] = None, event_time: Optional[float] = None,
                    metadata: Optional[Metadata] = None) -> np.ndarray:  # fmt: skip
        """See `MonolithClient.score`."""
        return await self.predict(messages.score_features(user, candidates), request_id, event_time, metadata)

    async def predict(self, features: Mapping[str, Any], request_id: Optional[str] = None,
                      event_time: Union[float, Sequence[float], None] = None,
                      metadata: Optional[Metadata] = None) -> np.ndarray:  # fmt: skip
        """See `MonolithClient.predict`."""
        request = messages.predict_request(self.model_name, self.signature_name, features, request_id, event_time)
        response = await self._call(self._serving(), messages.PREDICT, request, metadata, self.backoff, PredictError)
        return messages.scores(response)

    async def input_names(self, metadata: Optional[Metadata] = None) -> list[str]:
        """See `MonolithClient.input_names`."""
        request = messages.metadata_request(self.model_name)
        response = await self._call(self._serving(), messages.GET_MODEL_METADATA, request, metadata, self.backoff,
                                    PredictError)  # fmt: skip
        return messages.input_names(response, self.signature_name)

    async def report_action(self, request_id: str, item_id: Any, kind: str = "click", label: float = 1.0,
                            event_time: Optional[float] = None, metadata: Optional[Metadata] = None) -> None:  # fmt: skip
        """See `MonolithClient.report_action`."""
        await self.report_actions([(request_id, item_id, kind, label, event_time)], metadata)

    async def report_actions(self, actions: Sequence[ActionLike], metadata: Optional[Metadata] = None) -> int:
        """See `MonolithClient.report_actions`."""
        address = self.need_joiner()
        request = messages.actions_request(actions)
        if self._joiner_channel is None:
            self._joiner_channel = open_aio_channel(address, self.tls, self.interceptors)
        response = await self._call(self._joiner_channel, messages.REPORT_ACTIONS, request, metadata,
                                    self.action_backoff, ActionError)  # fmt: skip
        return int(response.accepted)

    def _serving(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = open_aio_channel(self.address, self.tls, self.interceptors)
        return self._channel

    async def _call(self, channel: grpc.aio.Channel, method: Method, request: Any, metadata: Optional[Metadata],
                    backoff: Backoff, error: Callable[[grpc.StatusCode, str], MonolithClientError]) -> Any:  # fmt: skip
        call = channel.unary_unary(method.path, request_serializer=method.serialize,
                                   response_deserializer=method.deserialize)  # fmt: skip
        attempt = 0
        call_metadata = self.call_metadata(metadata)
        while True:
            try:
                return await call(request, timeout=self.timeout, metadata=call_metadata)
            except grpc.aio.AioRpcError as exc:
                attempt += 1
                if attempt > backoff.retries or not retryable(exc):
                    raise error(exc.code(), exc.details() or "") from None
                await asyncio.sleep(backoff.delay(attempt))

    async def close(self) -> None:
        for channel in (self._channel, self._joiner_channel):
            if channel is not None:
                await channel.close()
        self._channel = self._joiner_channel = None

    async def __aenter__(self) -> AsyncMonolithClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
