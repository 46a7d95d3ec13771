"""Kubernetes mode of the controller: the release's pods, one active replica, Events.

A thin adapter behind `ClusterView` (cluster.py), over the official `kubernetes` client:

- **Pods** of the release, found by label selector, kept by list + watch: one list gives
  the pods and a resourceVersion, a watch from it (with bookmarks, which move the
  resourceVersion on without an object) streams the changes. When the server has
  compacted past our resourceVersion it answers 410 Gone, and the watch lists again. A
  pod that restarts a container, stops being ready or is deleted wakes the controller
  at once (instead of at its next health poll) and is recorded as a Warning Event.
  Trainers are the release's running trainer pods, reached on their control port.
- **Leader election** through a `coordination.k8s.io/v1` Lease: a replica acts only
  while it holds the lease. It takes a lease nobody renewed for `leaseDurationSeconds`,
  renews its own every `renew_interval`, and every write carries the resourceVersion it
  read, so of two replicas racing for it one gets 409 Conflict and stays passive.
- **Events**: a core/v1 Event on the controller's pod for every checkpoint, restore and
  failure it handles, so `kubectl describe pod` shows them.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from monolith.controller.cluster import WARNING

_LOGGER = logging.getLogger("monolith.controller.kube")

COMPONENT_LABEL = "app.kubernetes.io/component"
TRAINER_COMPONENT = "trainer"
EVENT_SOURCE = "monolith-controller"
GONE = 410
CONFLICT = 409
NOT_FOUND = 404


def api_client(kubeconfig: str | None = None, host: str | None = None) -> client.ApiClient:
    """An API client: in-cluster config by default, else a kubeconfig file, else a plain host URL (tests)."""
    if host:
        configuration = client.Configuration(host=host)
        return client.ApiClient(configuration)
    if kubeconfig:
        configuration = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        return client.ApiClient(configuration)
    configuration = client.Configuration()
    config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclasses.dataclass(frozen=True)
class PodState:
    """What the controller keeps of one pod."""

    name: str
    component: str
    ip: str
    phase: str
    ready: bool
    restarts: int

    @classmethod
    def of(cls, pod: Any) -> PodState:
        status = pod.status
        statuses = (status.container_statuses if status is not None else None) or []
        conditions = (status.conditions if status is not None else None) or []
        return cls(
            name=pod.metadata.name,
            component=(pod.metadata.labels or {}).get(COMPONENT_LABEL, ""),
            ip=(status.pod_ip if status is not None else None) or "",
            phase=(status.phase if status is not None else None) or "",
            ready=any(c.type == "Ready" and c.status == "True" for c in conditions),
            restarts=sum(s.restart_count or 0 for s in statuses),
        )


class PodWatch:
    """The release's pods, kept current by list + watch (see the module docstring).

    Args:
        core: the CoreV1Api.
        namespace: the release's namespace.
        selector: the label selector of the release's pods.
        on_failure: called with a pod and a reason when a pod fails (restart, not ready, deleted).
        watch_seconds: how long one watch request lasts before it is renewed.
    """

    def __init__(self, core: client.CoreV1Api, namespace: str, selector: str,
                 on_failure: Any = None, watch_seconds: int = 60) -> None:  # fmt: skip
        self._core = core
        self._namespace = namespace
        self._selector = selector
        self._on_failure = on_failure
        self._watch_seconds = watch_seconds
        self._lock = threading.Lock()
        self._pods: dict[str, PodState] = {}
        self.resource_version: str | None = None
        self.lists = 0  # how many times it listed (1 + one per 410 Gone)
        self._watch: watch.Watch | None = None

    def pods(self) -> list[PodState]:
        with self._lock:
            return sorted(self._pods.values(), key=lambda p: p.name)

    def relist(self) -> None:
        """Lists the pods: the whole state, and the resourceVersion to watch from."""
        listed = self._core.list_namespaced_pod(self._namespace, label_selector=self._selector)
        pods = {p.metadata.name: PodState.of(p) for p in listed.items}
        with self._lock:
            self._pods = pods
        self.resource_version = listed.metadata.resource_version
        self.lists += 1

    def watch_once(self) -> None:
        """One watch request from the current resourceVersion (listing first if there is none).

        Raises:
            ApiException: anything but 410 Gone, which clears the resourceVersion (the next
                call lists again).
        """
        if self.resource_version is None:
            self.relist()
        self._watch = watch.Watch()
        try:
            for event in self._watch.stream(self._core.list_namespaced_pod, self._namespace,
                                            label_selector=self._selector, resource_version=self.resource_version,
                                            allow_watch_bookmarks=True, timeout_seconds=self._watch_seconds):  # fmt: skip
                self._apply(event)
        except ApiException as exc:
            if exc.status != GONE:
                raise
            _LOGGER.info("pod watch: resourceVersion %s is gone (410); listing again", self.resource_version)
            self.resource_version = None
        finally:
            self._watch = None

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        raw = event["raw_object"]
        version = (raw.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":  # no object: only a newer resourceVersion to resume from
            self.resource_version = version or self.resource_version
            return
        pod = PodState.of(event["object"])
        with self._lock:
            old = self._pods.get(pod.name)
            if kind == "DELETED":
                self._pods.pop(pod.name, None)
            else:
                self._pods[pod.name] = pod
        self.resource_version = version or self.resource_version
        reason = None
        if kind == "DELETED":
            reason = "deleted"
        elif old is not None and pod.restarts > old.restarts:
            reason = f"restarted a container (restarts {old.restarts} -> {pod.restarts})"
        elif old is not None and old.ready and not pod.ready:
            reason = "is no longer ready"
        if reason is not None and self._on_failure is not None:
            self._on_failure(pod, reason)


class LeaseElection:
    """One active controller among replicas, through a coordination.k8s.io/v1 Lease.

    Args:
        coordination: the CoordinationV1Api.
        namespace: where the Lease lives.
        name: the Lease's name.
        holder: this replica's identity (its pod name).
        duration: seconds a lease stays held without a renewal.
        clock: the wall clock (lease times are wall-clock timestamps, shared by replicas).
    """

    def __init__(self, coordination: client.CoordinationV1Api, namespace: str, name: str, holder: str,
                 duration: int = 15, clock: Any = _now) -> None:  # fmt: skip
        self._api = coordination
        self._namespace = namespace
        self.name = name
        self.holder = holder
        self.duration = duration
        self._clock = clock
        self._held_until = 0.0  # monotonic: act only before this

    @property
    def leader(self) -> bool:
        return time.monotonic() < self._held_until

    def try_acquire(self) -> bool:
        """Takes or renews the lease once; whether this replica holds it now.

        A write that loses a race (409) or fails leaves this replica passive until the next try.
        """
        started = time.monotonic()
        now = self._clock()
        try:
            lease = self._api.read_namespaced_lease(self.name, self._namespace)
        except ApiException as exc:
            if exc.status != NOT_FOUND:
                return self.step_down(f"reading the lease failed: {exc.status} {exc.reason}")
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self._namespace},
                    "spec": self._spec(now, now, 0)}  # fmt: skip
            return self._write(lambda: self._api.create_namespaced_lease(self._namespace, body), started, "created")
        spec = lease.spec
        holder = spec.holder_identity if spec is not None else None
        version = lease.metadata.resource_version
        transitions = (spec.lease_transitions if spec is not None else None) or 0
        if holder == self.holder:
            acquired = spec.acquire_time or now
            body = self._body(version, self._spec(acquired, now, transitions))
            return self._write(lambda: self._api.replace_namespaced_lease(self.name, self._namespace, body), started,
                               None)  # fmt: skip
        renewed = spec.renew_time if spec is not None else None
        duration = (spec.lease_duration_seconds if spec is not None else None) or self.duration
        if holder and renewed is not None and renewed + datetime.timedelta(seconds=duration) > now:
            return self.step_down(None)  # another replica holds it
        body = self._body(version, self._spec(now, now, transitions + 1))
        return self._write(lambda: self._api.replace_namespaced_lease(self.name, self._namespace, body), started,
                           f"taken over from {holder or 'nobody'}")  # fmt: skip

    def _spec(self, acquired: datetime.datetime, renewed: datetime.datetime, transitions: int) -> dict[str, Any]:
        return {"holderIdentity": self.holder, "leaseDurationSeconds": self.duration,
                "acquireTime": _micro_time(acquired), "renewTime": _micro_time(renewed),
                "leaseTransitions": transitions}  # fmt: skip

    def _body(self, version: str, spec: dict[str, Any]) -> dict[str, Any]:
        # The resourceVersion read: the server refuses the write (409) if the lease changed since.
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self._namespace, "resourceVersion": version},
                "spec": spec}  # fmt: skip

    def _write(self, call: Any, started: float, how: str | None) -> bool:
        try:
            call()
        except ApiException as exc:
            if exc.status == CONFLICT:
                return self.step_down("another replica wrote the lease first (409 Conflict)")
            return self.step_down(f"writing the lease failed: {exc.status} {exc.reason}")
        if how is not None or not self.leader:
            _LOGGER.info("lease %s %s: %s is the active controller", self.name, how or "renewed", self.holder)
        # Counted from before the read: the others see our renewTime, taken no earlier.
        self._held_until = started + self.duration
        return True

    def step_down(self, why: str | None) -> bool:
        """Stops acting as the leader (until the next successful write); returns False."""
        if self.leader and why:
            _LOGGER.warning("lease %s lost: %s; passive", self.name, why)
        self._held_until = 0.0
        return False


def _micro_time(t: datetime.datetime) -> str:
    """A Kubernetes MicroTime: RFC 3339 with microseconds, in UTC."""
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class EventRecorder:
    """Records core/v1 Events about one object (the controller's pod).

    Args:
        core: the CoreV1Api.
        namespace: the object's namespace.
        pod: the object's name (a Pod).
        instance: who reports (the pod name).
    """

    def __init__(self, core: client.CoreV1Api, namespace: str, pod: str, instance: str) -> None:
        self._core = core
        self._namespace = namespace
        self._pod = pod
        self._instance = instance

    def record(self, kind: str, reason: str, message: str, about: str | None = None) -> None:
        """Creates one Event; a failure is logged, never raised (an Event is a record, not a step)."""
        now = _now()
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{about or self._pod}.", "namespace": self._namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": about or self._pod,
                               "namespace": self._namespace},
            "reason": reason, "message": message[:1024], "type": kind, "count": 1,
            "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "source": {"component": EVENT_SOURCE}, "reportingComponent": EVENT_SOURCE,
            "reportingInstance": self._instance,
        }  # fmt: skip
        try:
            self._core.create_namespaced_event(self._namespace, body)
        except ApiException as exc:
            _LOGGER.warning("could not record event %s (%s): %s %s", reason, message, exc.status, exc.reason)


@dataclasses.dataclass(frozen=True)
class KubeSettings:
    """Kubernetes mode's flags.

    Attributes:
        namespace: the release's namespace.
        selector: label selector of the release's pods.
        holder: this replica's identity (its pod name): the lease holder, the Events' object.
        lease_name: the Lease's name.
        lease_duration: seconds the lease stays held without a renewal.
        renew_interval: seconds between renewals (well under the duration).
        trainer_control_port: the trainers' TrainerControl port (0: no trainers are paused).
        watch_seconds: seconds one watch request lasts.
    """

    namespace: str
    selector: str
    holder: str
    lease_name: str = "monolith-controller"
    lease_duration: int = 15
    renew_interval: float = 5.0
    trainer_control_port: int = 0
    watch_seconds: int = 60


class KubeView:
    """The controller's `ClusterView` in Kubernetes (see the module docstring).

    Args:
        api: an API client (`api_client`).
        settings: namespace, selector, identity, lease.
    """

    def __init__(self, api: client.ApiClient, settings: KubeSettings) -> None:
        self.settings = settings
        core = client.CoreV1Api(api)
        self.events = EventRecorder(core, settings.namespace, settings.holder, settings.holder)
        self.pods = PodWatch(core, settings.namespace, settings.selector, self._pod_failed, settings.watch_seconds)
        self.lease = LeaseElection(client.CoordinationV1Api(api), settings.namespace, settings.lease_name,
                                   settings.holder, settings.lease_duration)  # fmt: skip
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch_pods, name="pod-watch", daemon=True),
                         threading.Thread(target=self._keep_lease, name="lease", daemon=True)]  # fmt: skip

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self._stop.set()
        self.pods.stop()
        for thread in self._threads:
            thread.join(timeout=10)

    def is_leader(self) -> bool:
        return self.lease.leader

    def trainers(self) -> list[str] | None:
        port = self.settings.trainer_control_port
        if not port:
            return None  # the ones given by flag, if any
        return [f"{p.ip}:{port}" for p in self.pods.pods()
                if p.component == TRAINER_COMPONENT and p.ip and p.phase == "Running"]  # fmt: skip

    def wait(self, stop: threading.Event, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not stop.is_set() and not self._changed.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._changed.wait(min(remaining, 0.1))
        self._changed.clear()

    def record(self, kind: str, reason: str, message: str) -> None:
        self.events.record(kind, reason, message)

    def _pod_failed(self, pod: PodState, reason: str) -> None:
        self._changed.set()  # look now, not at the next poll
        if self.lease.leader:
            self.events.record(WARNING, "PodFailed", f"{pod.component or 'pod'} {pod.name} {reason}", about=pod.name)

    def _watch_pods(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self.pods.watch_once()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - an API outage: retried with backoff, never fatal
                failures += 1
                _LOGGER.warning("pod watch failed (%s); retrying", exc)
                self.pods.resource_version = None  # start over from a list
                self._stop.wait(min(30.0, 0.5 * 2**failures))

    def _keep_lease(self) -> None:
        while not self._stop.is_set():
            try:
                self.lease.try_acquire()
            except Exception as exc:  # noqa: BLE001 - the API away: passive until it answers
                self.lease.step_down(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.settings.renew_interval)
