"""The dense-PS core: named float32 tensors, their optimizer and version. No gRPC in here.

One lock guards everything. Pushes are serialized, so each one steps the optimizer on
the state the previous one left; pulls copy under the lock, so a caller never sees half a
push. Every request is validated whole before anything changes, so a rejected push or
restore leaves the store exactly as it was.

Incarnations: versions restart with a new process and jump at a restore, so the store
carries a random incarnation id, drawn at start and at every restore; a follower
(model-serving) that sees a new one pulls in full instead of comparing versions. A store
made with `restore_required` (a dense-PS restarted under a checkpoint controller) refuses
init, pull and push until it is restored, so nobody trains on or serves freshly
initialized parameters in place of the checkpointed ones.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import uuid
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from monolith.common.errors import FailedPrecondition, InvalidArgument, MonolithError, Unavailable
from monolith.common.wire import require_finite
from monolith.dense_ps.optimizers import STEP_KEY, make_dense_optimizer
from monolith.model.config import DenseOptimizerConfig


@dataclasses.dataclass(frozen=True)
class DenseStats:
    """Sizes and counters of a store.

    Attributes:
        version: current version; 0 before init.
        num_tensors: parameter tensors held.
        parameters: parameter values, summed over tensors.
        bytes: bytes held by the parameters and their optimizer state.
        pushes: pushes applied since the store was made.
        rejected_pushes: pushes rejected since the store was made.
        optimizer: the optimizer's kind.
        incarnation: the store's random id (see the module docstring).
        awaiting_restore: made with `restore_required` and not restored yet.
    """

    version: int
    num_tensors: int
    parameters: int
    bytes: int
    pushes: int
    rejected_pushes: int
    optimizer: str
    incarnation: str = ""
    awaiting_restore: bool = False


class DenseSnapshot(NamedTuple):
    """A consistent copy of a store, as `DenseStore.restore` takes it back."""

    version: int
    tensors: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray]


def _shape(array: np.ndarray) -> tuple[int, ...]:
    return tuple(int(d) for d in array.shape)


class DenseStore:
    """The dense tower's parameters, applying pushed gradients with one optimizer.

    Args:
        optimizer: how pushes are applied.
        restore_required: refuse init, pull and push (Unavailable) until `restore` or
            `end_restore_wait`.
    """

    def __init__(self, optimizer: DenseOptimizerConfig = DenseOptimizerConfig(), restore_required: bool = False) -> None:
        self.optimizer_config = optimizer
        self.incarnation = uuid.uuid4().hex
        self._awaiting_restore = restore_required
        # Called after a restore ends the wait (the process reports SERVING from then on).
        self.on_restored: Callable[[], None] | None = None
        self._optimizer = make_dense_optimizer(optimizer)
        self._lock = threading.Lock()
        self._params: dict[str, np.ndarray] = {}  # name -> float32, in name order
        self._version = 0
        self._pushes = 0
        self._rejected = 0

    @property
    def version(self) -> int:
        """The current version; 0 before init."""
        return self._version

    @property
    def awaiting_restore(self) -> bool:
        """Made with `restore_required` and neither restored nor released yet."""
        return self._awaiting_restore

    def end_restore_wait(self) -> str:
        """Ends a restore wait without parameters (there is no checkpoint yet): the next init sets them.

        Drops any parameters held and takes a new incarnation, which it returns.
        """
        with self._lock:
            self._params = {}
            self._optimizer.reset({})
            self._version = 0
            self.incarnation = uuid.uuid4().hex
            self._awaiting_restore = False
            incarnation = self.incarnation
        self._restored()
        return incarnation

    def init(self, tensors: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        """Adopts initial parameters, or answers with the held ones if they have the same shapes.

        Args:
            tensors: initial values by name.

        Returns:
            (version, copies of the parameters held afterwards, in name order).

        Raises:
            InvalidArgument: no tensors, an empty name, or non-finite values.
            FailedPrecondition: the store holds parameters of other names or shapes.
        """
        if not tensors:
            raise InvalidArgument("init: at least one tensor is required")
        self._check_not_awaiting("init")
        for name, value in tensors.items():
            if not name:
                raise InvalidArgument("init: tensor names must be non-empty")
            require_finite(np.asarray(value), f"init tensor {name!r}")
        with self._lock:
            if not self._params:
                self._adopt({n: tensors[n] for n in sorted(tensors)}, version=1)
            else:
                self._check_same_layout(tensors)
            return self._version, self._copies(list(self._params))

    def pull(self, names: Sequence[str] = (), if_newer_than: int = 0) -> tuple[int, dict[str, np.ndarray] | None]:
        """The parameters and their version, or only the version when the caller is current.

        Args:
            names: tensors to copy; empty means all.
            if_newer_than: copy only if the version is newer than this; 0 always copies.

        Returns:
            (version, copies by name), or (version, None) when version <= if_newer_than.

        Raises:
            InvalidArgument: a negative `if_newer_than`, or unknown or repeated names.
            FailedPrecondition: before init.
            Unavailable: awaiting a restore.
        """
        _, version, tensors = self.pull_incarnation(names, if_newer_than)
        return version, tensors

    def pull_incarnation(
        self, names: Sequence[str] = (), if_newer_than: int = 0, if_incarnation: str = ""
    ) -> tuple[str, int, dict[str, np.ndarray] | None]:
        """`pull`, with the incarnation the answer belongs to, read under the same lock.

        Args:
            names: tensors to copy; empty means all.
            if_newer_than: copy only if the version is newer than this; 0 always copies.
            if_incarnation: the incarnation `if_newer_than` belongs to; when given and not
                this store's, copies whatever `if_newer_than` says.

        Returns:
            (incarnation, version, copies by name or None when the caller is current).
        """
        if if_newer_than < 0:
            raise InvalidArgument(f"if_newer_than must be >= 0, got {if_newer_than}")
        with self._lock:
            self._check_not_awaiting("pull")
            self._check_initialized()
            self._check_names(names, "pull")
            same = not if_incarnation or if_incarnation == self.incarnation
            if same and self._version <= if_newer_than:
                return self.incarnation, self._version, None
            return self.incarnation, self._version, self._copies(list(names) or list(self._params))

    def push(self, grads: Mapping[str, np.ndarray]) -> int:
        """Applies one optimizer step with gradients of some or all tensors.

        Returns:
            The version after this push.

        Raises:
            InvalidArgument: no gradients, unknown names, a wrong shape, or non-finite values;
                nothing is applied.
            FailedPrecondition: before init.
        """
        return self._push(grads, return_parameters=False)[0]

    def push_pull(self, grads: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        """`push`, then every parameter as this push left them, read under the same lock.

        Returns:
            (the version after this push, copies of the parameters by name).
        """
        version, params = self._push(grads, return_parameters=True)
        assert params is not None
        return version, params

    def _push(self, grads: Mapping[str, np.ndarray], return_parameters: bool) -> tuple[int, dict[str, np.ndarray] | None]:
        try:
            if not grads:
                raise InvalidArgument("push: at least one gradient is required")
            for name, grad in grads.items():
                require_finite(np.asarray(grad), f"gradient {name!r}")
            with self._lock:
                self._check_not_awaiting("push")
                self._check_initialized()
                self._check_names(list(grads), "push")
                for name, grad in grads.items():
                    expected, got = _shape(self._params[name]), _shape(np.asarray(grad))
                    if got != expected:
                        raise InvalidArgument(f"gradient {name!r}: expected shape {expected}, got {got}")
                self._optimizer.apply(self._params, grads)
                self._version += 1
                self._pushes += 1
                return self._version, self._copies(list(self._params)) if return_parameters else None
        except MonolithError:
            self.count_rejected_push()
            raise

    def count_rejected_push(self) -> None:
        """Counts a push rejected before it reached `push` (e.g. a malformed message)."""
        with self._lock:
            self._rejected += 1

    def stats(self) -> DenseStats:
        """Sizes and counters."""
        with self._lock:
            state_bytes = sum(a.nbytes for s in self._optimizer.state.values() for a in s.values())
            return DenseStats(
                version=self._version,
                num_tensors=len(self._params),
                parameters=sum(p.size for p in self._params.values()),
                bytes=sum(p.nbytes for p in self._params.values()) + state_bytes,
                pushes=self._pushes,
                rejected_pushes=self._rejected,
                optimizer=self.optimizer_config.kind,
                incarnation=self.incarnation,
                awaiting_restore=self._awaiting_restore,
            )

    # ------------------------------------------------------------ checkpoints

    def snapshot(self) -> DenseSnapshot:
        """A consistent copy of the version, parameters and optimizer state.

        The optimizer state is flat: "<tensor>/<state>" arrays (e.g. "dense/kernel/m") and
        "step", a 0-d int64 array.

        Raises:
            FailedPrecondition: before init.
        """
        with self._lock:
            self._check_not_awaiting("snapshot")
            self._check_initialized()
            return DenseSnapshot(self._version, self._copies(list(self._params)), self._optimizer.state_dict())

    def restore(
        self, version: int, tensors: Mapping[str, np.ndarray], optimizer_state: Mapping[str, np.ndarray]
    ) -> None:
        """Replaces everything with a snapshot (names and shapes may differ from the current ones).

        Takes a new incarnation and ends a restore wait.

        Raises:
            InvalidArgument: a version < 1, no tensors, or optimizer state that does not fit
                the tensors and this store's optimizer (missing, unexpected or misshapen
                entries, non-finite values); nothing changes.
        """
        if not isinstance(version, (int, np.integer)) or version < 1:
            raise InvalidArgument(f"restore: version must be an integer >= 1, got {version!r}")
        if not tensors:
            raise InvalidArgument("restore: at least one tensor is required")
        shapes = {name: _shape(np.asarray(t)) for name, t in tensors.items()}
        expected = self._optimizer.state_shapes(shapes)
        missing = sorted(expected.keys() - optimizer_state.keys())
        unexpected = sorted(optimizer_state.keys() - expected.keys())
        if missing or unexpected:
            raise InvalidArgument(
                f"restore: optimizer state does not fit the tensors and the {self.optimizer_config.kind} optimizer: "
                f"missing {missing}, unexpected {unexpected}"
            )
        for key, shape in expected.items():
            got = _shape(np.asarray(optimizer_state[key]))
            if got != shape:
                raise InvalidArgument(f"restore: optimizer state {key!r}: expected shape {shape}, got {got}")
            require_finite(np.asarray(optimizer_state[key], np.float64), f"restore: optimizer state {key!r}")
        step = optimizer_state[STEP_KEY]
        if int(step) != step or step < 0:
            raise InvalidArgument(f"restore: optimizer state 'step' must be an integer >= 0, got {step}")
        for name, value in tensors.items():
            require_finite(np.asarray(value), f"restore: tensor {name!r}")
        with self._lock:
            self._params = {n: np.array(tensors[n], np.float32) for n in sorted(tensors)}
            self._optimizer.load_state_dict(optimizer_state, list(self._params))
            self._version = int(version)
            self.incarnation = uuid.uuid4().hex
            self._awaiting_restore = False
        self._restored()

    # -------------------------------------------------------------- internals

    def _adopt(self, tensors: Mapping[str, np.ndarray], version: int) -> None:
        self._params = {n: np.array(t, np.float32) for n, t in tensors.items()}  # copies
        self._optimizer.reset({n: p.shape for n, p in self._params.items()})
        self._version = version

    def _copies(self, names: list[str]) -> dict[str, np.ndarray]:
        return {n: self._params[n].copy() for n in names}

    def _restored(self) -> None:
        if self.on_restored is not None:
            self.on_restored()

    def _check_not_awaiting(self, what: str) -> None:
        if self._awaiting_restore:
            raise Unavailable(f"{what}: this dense-PS is waiting to be restored from a checkpoint")

    def _check_initialized(self) -> None:
        if not self._params:
            raise FailedPrecondition("not initialized: no trainer has called Init yet")

    def _check_names(self, names: Sequence[str], what: str) -> None:
        unknown = sorted({n for n in names if n not in self._params})
        if unknown:
            raise InvalidArgument(
                f"{what}: unknown tensor(s) {', '.join(map(repr, unknown))}; held: {', '.join(self._params)}"
            )
        repeated = sorted(n for n, count in collections.Counter(names).items() if count > 1)
        if repeated:
            raise InvalidArgument(f"{what}: tensor(s) {', '.join(map(repr, repeated))} named more than once")

    def _check_same_layout(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Raises FailedPrecondition naming the first difference from the held tensors."""
        for name in sorted(tensors):
            if name not in self._params:
                raise FailedPrecondition(
                    f"init: tensor {name!r} is not held here; held: {', '.join(self._params)}"
                )
            held, got = _shape(self._params[name]), _shape(np.asarray(tensors[name]))
            if held != got:
                raise FailedPrecondition(f"init: tensor {name!r} is held with shape {held}, got {got}")
        for name in self._params:
            if name not in tensors:
                raise FailedPrecondition(f"init: held tensor {name!r} is missing from the request")

