"""The controller's Kubernetes adapter (monolith.controller.kube) against a stand-in API server.

No kube-apiserver can run here (no cluster, no etcd, no container runtime), so these tests
run the adapter, through the real `kubernetes` client, against a small local HTTP server
that answers the few API calls it makes with the real API's JSON shapes and semantics:
pods list and watch (resourceVersions, label selectors, BOOKMARK events, an ERROR event
with a 410 Expired Status once the requested version is compacted), Leases get / create /
update (409 AlreadyExists and 409 Conflict on a stale resourceVersion), and Events create.
"""

from __future__ import annotations

import copy
import datetime
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client

from helpers.waiting import wait_for
from monolith.controller.cluster import NORMAL, WARNING
from monolith.controller.kube import EventRecorder, KubeSettings, KubeView, LeaseElection, PodWatch, api_client

NAMESPACE = "ml"
SELECTOR = "app.kubernetes.io/instance=rel"
LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases"
PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"
EVENTS = f"/api/v1/namespaces/{NAMESPACE}/events"
DEADLINE = 20.0  # seconds to wait for what the views' threads do


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip


def pod(name: str, component: str, ip: str, instance: str = "rel", restarts: int = 0, ready: bool = True) -> dict:
    return {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": str(uuid.uuid4()),
                     "labels": {"app.kubernetes.io/instance": instance, "app.kubernetes.io/component": component}},
        "spec": {"containers": [{"name": component, "image": "monolith:test"}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                   "containerStatuses": [{"name": component, "ready": ready, "restartCount": restarts,
                                          "image": "monolith:test", "imageID": "", "started": True}]},
    }  # fmt: skip


class FakeApiServer:
    """The API calls the adapter makes, with the real API's shapes (see the module docstring)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rv = 100
        self.pods: dict[str, dict] = {}
        self.history: list[tuple[int, str, dict]] = []  # (resourceVersion, type, object)
        self.compacted = 0  # watches from a resourceVersion below this get 410
        self.leases: dict[str, dict] = {}
        self.events: list[dict] = []
        self.watches: list[dict[str, str]] = []  # the query of every watch request
        self.lists = 0
        self.before_next_put: Callable[[], None] | None = None
        self.open_watches = 0
        self.closed = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

            def do_GET(self) -> None:  # noqa: N802
                url = urllib.parse.urlparse(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                if url.path == PODS and query.get("watch") == "true":
                    return fake._watch(self, query)
                if url.path == PODS:
                    return self._send(200, fake._list(query))
                if url.path.startswith(LEASES + "/"):
                    name = url.path.rsplit("/", 1)[1]
                    with fake.cond:
                        lease = copy.deepcopy(fake.leases.get(name))
                    if lease is None:
                        return self._send(
                            404, _status(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found')
                        )
                    return self._send(200, lease)
                self._send(404, _status(404, "NotFound", url.path))

            def do_POST(self) -> None:  # noqa: N802
                body = self._body()
                if self.path.startswith(LEASES):
                    name = body["metadata"]["name"]
                    with fake.cond:
                        if name in fake.leases:
                            return self._send(
                                409,
                                _status(409, "AlreadyExists", f'leases.coordination.k8s.io "{name}" already exists'),
                            )
                        fake.rv += 1
                        body["metadata"].update(resourceVersion=str(fake.rv), uid=str(uuid.uuid4()))
                        fake.leases[name] = body
                    return self._send(201, body)
                if self.path.startswith(EVENTS):
                    with fake.cond:
                        fake.rv += 1
                        body["metadata"]["name"] = body["metadata"].pop("generateName") + uuid.uuid4().hex[:5]
                        body["metadata"]["resourceVersion"] = str(fake.rv)
                        fake.events.append(body)
                    return self._send(201, body)
                self._send(404, _status(404, "NotFound", self.path))

            def do_PUT(self) -> None:  # noqa: N802
                body = self._body()
                hook, fake.before_next_put = fake.before_next_put, None
                if hook is not None:
                    hook()  # another writer gets in between this replica's read and its write
                name = self.path.rsplit("/", 1)[1]
                with fake.cond:
                    current = fake.leases.get(name)
                    if current is None:
                        return self._send(404, _status(404, "NotFound", name))
                    if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                        return self._send(409, _status(
                            409, "Conflict", f'Operation cannot be fulfilled on leases.coordination.k8s.io "{name}": '
                            "the object has been modified; please apply your changes to the latest version and "
                            "try again"))  # fmt: skip
                    fake.rv += 1
                    body["metadata"]["resourceVersion"] = str(fake.rv)
                    fake.leases[name] = body
                return self._send(200, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    # --- state changes, as the cluster would make them
    def put_pod(self, body: dict, kind: str | None = None) -> int:
        with self.cond:
            self.rv += 1
            body = copy.deepcopy(body)
            body["metadata"]["resourceVersion"] = str(self.rv)
            kind = kind or ("MODIFIED" if body["metadata"]["name"] in self.pods else "ADDED")
            self.pods[body["metadata"]["name"]] = body
            self.history.append((self.rv, kind, body))
            self.cond.notify_all()
            return self.rv

    def delete_pod(self, name: str) -> int:
        with self.cond:
            self.rv += 1
            body = self.pods.pop(name)
            body["metadata"]["resourceVersion"] = str(self.rv)
            self.history.append((self.rv, "DELETED", body))
            self.cond.notify_all()
            return self.rv

    def compact(self) -> None:
        """etcd compaction: watches from any resourceVersion before now get 410 Gone."""
        with self.cond:
            self.compacted = self.rv + 1

    def close(self) -> None:
        """Ends every open watch, so no handler thread outlives the test, then stops serving."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            ended = self.cond.wait_for(lambda: self.open_watches == 0, timeout=10)
        self.server.shutdown()
        self.server.server_close()
        assert ended, f"{self.open_watches} watch(es) still open"

    # --- the API
    def _matches(self, body: dict, selector: str) -> bool:
        labels = body["metadata"].get("labels", {})
        return all(labels.get(k) == v for k, v in (term.split("=", 1) for term in selector.split(",") if term))

    def _list(self, query: dict[str, str]) -> dict:
        with self.cond:
            self.lists += 1
            items = [copy.deepcopy(p) for p in self.pods.values() if self._matches(p, query.get("labelSelector", ""))]
            return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)},
                    "items": items}  # fmt: skip

    def _watch(self, handler: BaseHTTPRequestHandler, query: dict[str, str]) -> None:
        with self.cond:
            self.open_watches += 1
        try:
            self._stream_watch(handler, query)
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True  # the client went away: its watch ends, as on a real API server
        finally:
            with self.cond:
                self.open_watches -= 1
                self.cond.notify_all()

    def _stream_watch(self, handler: BaseHTTPRequestHandler, query: dict[str, str]) -> None:
        self.watches.append(query)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

        def line(event: dict) -> None:
            data = (json.dumps(event) + "\n").encode()
            handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            handler.wfile.flush()

        since = int(query.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(query.get("timeoutSeconds", 5))
        selector = query.get("labelSelector", "")
        with self.cond:
            if since < self.compacted:
                line({"type": "ERROR", "object": _status(410, "Expired", f"too old resource version: {since} "
                                                                        f"({self.compacted})")})  # fmt: skip
                handler.wfile.write(b"0\r\n\r\n")
                return
            while True:
                for rv, kind, body in self.history:
                    if rv > since and self._matches(body, selector):
                        line({"type": kind, "object": body})
                since = self.rv
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed:
                    break
                if not self.cond.wait(min(remaining, 0.3)) and query.get("allowWatchBookmarks") == "true":
                    # Idle: a bookmark moves the client's resourceVersion past changes it does not watch.
                    line({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                                                         "metadata": {"resourceVersion": str(self.rv)}}})  # fmt: skip
        handler.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    yield server
    server.close()


def test_pod_watch_lists_then_watches_with_bookmarks_and_lists_again_after_410(api: FakeApiServer) -> None:
    api.put_pod(pod("rel-trainer-a", "trainer", "10.0.0.5"))
    api.put_pod(pod("rel-embedding-ps-training-0", "embedding-ps-training", "10.0.0.6"))
    api.put_pod(pod("other-trainer", "trainer", "10.0.9.9", instance="other"))  # another release
    failures: list[tuple[str, str]] = []
    core = client.CoreV1Api(api_client(host=api.url))
    watch = PodWatch(core, NAMESPACE, SELECTOR, lambda p, why: failures.append((p.name, why)), watch_seconds=1)

    watch.relist()
    assert [p.name for p in watch.pods()] == ["rel-embedding-ps-training-0", "rel-trainer-a"]
    listed = watch.resource_version
    assert listed == str(api.rv)

    # A container restart arrives on the watch, from the listed resourceVersion, with bookmarks asked for.
    restarted = api.put_pod(pod("rel-embedding-ps-training-0", "embedding-ps-training", "10.0.0.6", restarts=1))
    watch.watch_once()
    assert api.watches[-1]["resourceVersion"] == listed and api.watches[-1]["allowWatchBookmarks"] == "true"
    assert failures == [("rel-embedding-ps-training-0", "restarted a container (restarts 0 -> 1)")]
    assert int(watch.resource_version) >= restarted

    # Changes it does not watch move the version on only through a bookmark.
    elsewhere = api.put_pod(pod("other-trainer", "trainer", "10.0.9.9", instance="other", restarts=3))
    watch.watch_once()
    assert watch.resource_version == str(elsewhere) and len(failures) == 1

    # Deleted and not-ready pods are failures too.
    api.put_pod(pod("rel-trainer-a", "trainer", "10.0.0.5", ready=False))
    api.delete_pod("rel-embedding-ps-training-0")
    watch.watch_once()
    assert failures[1:] == [("rel-trainer-a", "is no longer ready"), ("rel-embedding-ps-training-0", "deleted")]
    assert [p.name for p in watch.pods()] == ["rel-trainer-a"]

    # Compacted past our version: 410 Gone, then a fresh list and a watch from its version.
    api.put_pod(pod("rel-trainer-b", "trainer", "10.0.0.7"))
    api.compact()
    lists = api.lists
    watch.watch_once()
    assert watch.resource_version is None
    watch.watch_once()
    assert api.lists == lists + 1 and watch.lists == 2
    assert [p.name for p in watch.pods()] == ["rel-trainer-a", "rel-trainer-b"]


def test_one_leader_among_two_replicas_a_stale_write_conflicts_and_an_expired_lease_is_taken_over(
    api: FakeApiServer,
) -> None:
    coordination = client.CoordinationV1Api(api_client(host=api.url))
    a = LeaseElection(coordination, NAMESPACE, "monolith-controller", "controller-a", duration=2)
    later = lambda: datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)  # noqa: E731
    b = LeaseElection(coordination, NAMESPACE, "monolith-controller", "controller-b", duration=2, clock=later)

    assert a.try_acquire() and a.leader  # created
    lease = api.leases["monolith-controller"]
    assert lease["spec"]["holderIdentity"] == "controller-a" and lease["spec"]["leaseTransitions"] == 0
    assert a.try_acquire()  # renewed
    assert api.leases["monolith-controller"]["metadata"]["resourceVersion"] != lease["metadata"]["resourceVersion"]

    # b sees the lease expired by its clock, but a renews between b's read and b's write:
    # b's write carries a stale resourceVersion, the server answers 409, b stays passive.
    api.before_next_put = a.try_acquire
    assert not b.try_acquire() and not b.leader
    assert api.leases["monolith-controller"]["spec"]["holderIdentity"] == "controller-a" and a.leader

    # a stops renewing; b takes the expired lease over, and a, seeing it held, is passive.
    assert b.try_acquire() and b.leader
    taken = api.leases["monolith-controller"]["spec"]
    assert taken["holderIdentity"] == "controller-b" and taken["leaseTransitions"] == 1
    assert not a.try_acquire() and not a.leader

    # Two replicas creating the lease at once: d read "not found" just before c created it,
    # so d's create is answered 409 AlreadyExists and d stays passive.
    c = LeaseElection(coordination, NAMESPACE, "other-lease", "controller-c", duration=2)
    d_api = client.CoordinationV1Api(api_client(host=api.url))
    d = LeaseElection(d_api, NAMESPACE, "other-lease", "controller-d", duration=2)

    def read_just_before_c_creates(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        finally:
            assert c.try_acquire()

    original = d_api.read_namespaced_lease
    d_api.read_namespaced_lease = read_just_before_c_creates
    assert not d.try_acquire() and not d.leader and c.leader
    assert api.leases["other-lease"]["spec"]["holderIdentity"] == "controller-c"


def test_events_are_recorded_on_the_controller_pod(api: FakeApiServer) -> None:
    recorder = EventRecorder(
        client.CoreV1Api(api_client(host=api.url)), NAMESPACE, "rel-controller-0", "rel-controller-0"
    )
    recorder.record(NORMAL, "Checkpoint", "checkpoint 000012 (incremental): 4096 rows")
    recorder.record(WARNING, "Restored", "restored (training shard 0 awaits a restore)")
    assert [(e["type"], e["reason"], e["involvedObject"]["name"], e["involvedObject"]["kind"]) for e in api.events] == [
        ("Normal", "Checkpoint", "rel-controller-0", "Pod"), ("Warning", "Restored", "rel-controller-0", "Pod")]  # fmt: skip
    assert api.events[0]["message"].startswith("checkpoint 000012") and api.events[0]["source"]["component"]


def test_two_views_elect_one_leader_find_trainers_and_wake_on_a_pod_failure(api: FakeApiServer) -> None:
    api.put_pod(pod("rel-trainer-a", "trainer", "10.0.0.5"))
    api.put_pod(pod("rel-dense-ps-0", "dense-ps", "10.0.0.8"))
    views = [KubeView(api_client(host=api.url), KubeSettings(NAMESPACE, SELECTOR, holder, lease_duration=2,
                                                              renew_interval=0.2, trainer_control_port=8710,
                                                              watch_seconds=1))
             for holder in ("rel-controller-a", "rel-controller-b")]  # fmt: skip
    for view in views:
        view.start()
    try:
        wait_for(lambda: any(v.is_leader() for v in views), "a leader", timeout=DEADLINE, interval=0.02)
        leader = next(v for v in views if v.is_leader())
        for _ in range(5):  # never two, through renewals (a slow renewal may leave none for a moment)
            assert sum(v.is_leader() for v in views) <= 1
            time.sleep(0.1)
        wait_for(lambda: leader.trainers() == ["10.0.0.5:8710"], "the trainer pod discovered", timeout=DEADLINE,
                 interval=0.02)

        # A pod restart wakes the controller's wait at once and is recorded by the leader only.
        stop = threading.Event()
        woke: list[float] = []
        waiter = threading.Thread(target=lambda: (leader.wait(stop, 30.0), woke.append(time.monotonic())))
        started = time.monotonic()
        waiter.start()
        api.put_pod(pod("rel-dense-ps-0", "dense-ps", "10.0.0.8", restarts=1))
        waiter.join(timeout=20)
        assert woke and woke[0] - started < 20
        wait_for(lambda: [e["reason"] for e in api.events] == ["PodFailed"], "the failure's event", timeout=DEADLINE,
                 interval=0.02)
        assert api.events[0]["involvedObject"]["name"] == "rel-dense-ps-0" and api.events[0]["type"] == "Warning"

        # The leader goes away: the other takes the lease over once it expires.
        leader.close()
        other = next(v for v in views if v is not leader)
        wait_for(other.is_leader, "the other replica to take over", timeout=30, interval=0.02)
        assert api.leases["monolith-controller"]["spec"]["holderIdentity"] == other.settings.holder
    finally:
        for view in views:
            view.close()
