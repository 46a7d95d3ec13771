"""The blocking client: feature dicts in, scores out (TF Serving's Predict API); actions to the
sample-joiner (its ReportActions API). Needs grpcio, protobuf and numpy, nothing of TensorFlow
or of the server package; `monolith_client.aio` is the same client for asyncio."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar, Union

import grpc
import numpy as np

from monolith_client import messages
from monolith_client.channel import Tls, open_channel
from monolith_client.errors import ActionError, MonolithClientError, PredictError
from monolith_client.messages import ActionLike, Method
from monolith_client.retry import NO_RETRIES, Backoff, retryable

Metadata = Sequence[tuple[str, str]]
_T = TypeVar("_T")


class ClientSettings:
    """What both clients share: where the servers are, how to reach them, what to send.

    Args:
        address: "host:port" of model-serving.
        model_name: the served model's name.
        signature_name: its signature.
        timeout: seconds per attempt of a call.
        joiner_address: "host:port" of the sample-joiner, for `report_action(s)`; None if
            this client only scores.
        tls: dial over TLS (both model-serving and the joiner), trusting the system's root
            certificates or `tls_ca`; implied by any other tls_ argument.
        tls_ca: PEM file of the certificate(s) to trust; for a self-signed server
            certificate, the certificate itself.
        tls_cert, tls_key: PEM client certificate and key, for servers that ask for one.
        tls_server_name: the name the servers' certificates must carry when it is not the
            host dialed (e.g. "localhost" when dialing 127.0.0.1).
        metadata: (key, value) pairs sent with every call, e.g. ("authorization", "Bearer ...");
            a call's own `metadata` is sent after them.
        retries: Predict and GetModelMetadata calls that find a server UNAVAILABLE are sent
            again up to this many times, with exponential backoff (0: never).
        retry_actions: retry ReportActions on UNAVAILABLE too (the joiner stores an action
            once by its id, so a repeat after a lost answer stores nothing twice).
        interceptors: gRPC client interceptors every call goes through, each attempt of a
            retried call included (tracing, a load tester's timing); the blocking client's
            take `grpc.UnaryUnaryClientInterceptor`s, the asyncio client's grpc.aio's.

    Raises:
        ValueError: a TLS file cannot be read, or a client certificate lacks its key.
    """

    def __init__(self, address: str, model_name: str = "monolith", signature_name: str = "serving_default",
                 timeout: float = 5.0, joiner_address: Optional[str] = None, *, tls: bool = False,
                 tls_ca: Union[str, os.PathLike[str], None] = None, tls_cert: Union[str, os.PathLike[str], None] = None,
                 tls_key: Union[str, os.PathLike[str], None] = None, tls_server_name: Optional[str] = None,
                 metadata: Metadata = (), retries: int = 2, retry_actions: bool = False,
                 interceptors: Sequence[Any] = ()) -> None:  # fmt: skip
        secure = tls or any(v is not None for v in (tls_ca, tls_cert, tls_key, tls_server_name))
        self.address = address
        self.model_name = model_name
        self.signature_name = signature_name
        self.timeout = timeout
        self.joiner_address = joiner_address
        self.tls = Tls(tls_ca, tls_cert, tls_key, tls_server_name) if secure else None
        if self.tls is not None:
            self.tls.credentials()  # a file that cannot be read fails here, not on the first call
        self.metadata = tuple(metadata)
        self.backoff = Backoff(retries=retries)
        self.action_backoff = self.backoff if retry_actions else NO_RETRIES
        self.interceptors = tuple(interceptors)
        self._open()

    def _open(self) -> None:
        """Opens what the client needs at once (the blocking client: its channel to model-serving)."""

    def call_metadata(self, metadata: Optional[Metadata]) -> Optional[tuple[tuple[str, str], ...]]:
        merged = self.metadata + tuple(metadata or ())
        return merged or None

    def need_joiner(self) -> str:
        if self.joiner_address is None:
            raise ValueError(
                "reporting actions needs the sample-joiner's address: MonolithClient(address, joiner_address='host:port')"
            )
        return self.joiner_address


class MonolithClient(ClientSettings):
    """Scores candidates for a user through the Predict API, and reports what the user did.

    Takes `ClientSettings`' arguments. Close it (or use `with`) when done.
    """

    def _open(self) -> None:
        self._channel = self._dial(self.address)
        self._joiner_channel: Optional[grpc.Channel] = None
        self._joiner_lock = threading.Lock()  # one channel however many threads report at once

    def _dial(self, address: str) -> grpc.Channel:
        channel = open_channel(address, self.tls)
        return grpc.intercept_channel(channel, *self.interceptors) if self.interceptors else channel

    def score(self, user: Mapping[str, Any], candidates: Mapping[str, Sequence[Any]], request_id: Optional[str] = None,
              event_time: Optional[float] = None, metadata: Optional[Metadata] = None) -> np.ndarray:  # fmt: skip
        """Probabilities that the user acts on each candidate.

        The user's features are sent once (outer size 1, broadcast by the server) and each
        candidate feature as a list with one entry per candidate; a multi-valued feature
        (e.g. genres) is a list per candidate.

        Args:
            user: one value per user feature.
            candidates: a list per candidate feature, all of the same length N.
            request_id: the id to report actions under. With one, model-serving logs the
                candidates as impressions (shown to the user), and each becomes a training
                sample: positive if an action is reported for it, else negative. None:
                nothing is logged (e.g. a call no user sees).
            event_time: when the candidates are shown, seconds since the epoch; None: the
                server's clock.
            metadata: (key, value) pairs for this call, after the client's.

        Returns:
            float32 [N] scores.

        Raises:
            ValueError: candidate features of different lengths.
            PredictError: the call failed (after retries of UNAVAILABLE).
        """
        return self.predict(messages.score_features(user, candidates), request_id, event_time, metadata)

    def predict(self, features: Mapping[str, Any], request_id: Optional[str] = None,
                event_time: Union[float, Sequence[float], None] = None,
                metadata: Optional[Metadata] = None) -> np.ndarray:  # fmt: skip
        """Scores for a batch of examples given feature by feature.

        Args:
            features: per feature, a list (or array) with one value per example, or one
                list of values per example for a multi-valued feature; a list of length 1
                is broadcast across the batch.
            request_id: the id to report actions under (see `score`); None: no impressions.
            event_time: seconds since the epoch, one for the call or one per example; None:
                the server's clock.
            metadata: (key, value) pairs for this call, after the client's.

        Returns:
            float32 [batch] scores.

        Raises:
            PredictError: the call failed (after retries of UNAVAILABLE).
        """
        request = messages.predict_request(self.model_name, self.signature_name, features, request_id, event_time)
        response = self._call(self._channel, messages.PREDICT, request, metadata, self.backoff, PredictError)
        return messages.scores(response)

    def input_names(self, metadata: Optional[Metadata] = None) -> list[str]:
        """The signature's input names, from GetModelMetadata."""
        request = messages.metadata_request(self.model_name)
        response = self._call(self._channel, messages.GET_MODEL_METADATA, request, metadata, self.backoff, PredictError)
        return messages.input_names(response, self.signature_name)

    def report_action(self, request_id: str, item_id: Any, kind: str = "click", label: float = 1.0,
                      event_time: Optional[float] = None, metadata: Optional[Metadata] = None) -> None:  # fmt: skip
        """Reports what the user did with a candidate of a `score(..., request_id=...)` call.

        Args:
            request_id: the request_id the candidate was scored under.
            item_id: the candidate: its item feature's value (e.g. the movie_id; an int is
                sent as its decimal text, as the model hashes it).
            kind: the action kind (one the joiner accepts, "click" by default).
            label: 1 for a positive action; 0 records one that is not.
            event_time: when it happened, seconds since the epoch; None: now.
            metadata: (key, value) pairs for this call, after the client's.

        Raises:
            ValueError: the client has no joiner_address.
            ActionError: the joiner refused it (e.g. INVALID_ARGUMENT) or could not store it.
        """
        self.report_actions([(request_id, item_id, kind, label, event_time)], metadata)

    def report_actions(self, actions: Sequence[ActionLike], metadata: Optional[Metadata] = None) -> int:
        """Reports several actions in one call; the joiner stores all of them or none.

        Args:
            actions: each a dict of `report_action`'s arguments (request_id and item_id
                required) or a tuple of them in order.
            metadata: (key, value) pairs for this call, after the client's.

        Returns:
            The number of actions stored.

        Raises:
            ValueError: the client has no joiner_address, or an action lacks request_id or item_id.
            ActionError: the joiner refused them (nothing is stored) or could not store them.
        """
        address = self.need_joiner()
        request = messages.actions_request(actions)
        with self._joiner_lock:
            if self._joiner_channel is None:
                self._joiner_channel = self._dial(address)
        response = self._call(self._joiner_channel, messages.REPORT_ACTIONS, request, metadata, self.action_backoff,
                              ActionError)  # fmt: skip
        return int(response.accepted)

    def _call(self, channel: grpc.Channel, method: Method, request: Any, metadata: Optional[Metadata],
              backoff: Backoff, error: Callable[[grpc.StatusCode, str], MonolithClientError]) -> Any:  # fmt: skip
        call = channel.unary_unary(method.path, request_serializer=method.serialize,
                                   response_deserializer=method.deserialize)  # fmt: skip
        call_metadata = self.call_metadata(metadata)
        return _with_retries(lambda: call(request, timeout=self.timeout, metadata=call_metadata), backoff, error)

    def close(self) -> None:
        self._channel.close()
        if self._joiner_channel is not None:
            self._joiner_channel.close()

    def __enter__(self) -> MonolithClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _with_retries(send: Callable[[], _T], backoff: Backoff,
                  error: Callable[[grpc.StatusCode, str], MonolithClientError]) -> _T:  # fmt: skip
    attempt = 0
    while True:
        try:
            return send()
        except grpc.RpcError as exc:
            attempt += 1
            if attempt > backoff.retries or not retryable(exc):
                raise error(exc.code(), exc.details() or "") from None
            time.sleep(backoff.delay(attempt))
