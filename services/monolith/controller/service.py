"""Wires a controller process (`monolith controller`): the controller, its gRPC service, its loop."""

from __future__ import annotations

import argparse
import logging
import socket
import threading

from monolith.api.controller.v1 import controller_pb2_grpc as pb_grpc
from monolith.checkpoint.store import CheckpointStore
from monolith.common.config import parse_config, positive_seconds
from monolith.common.server import Service, add_server_arguments, build_server, server_config_from_args
from monolith.controller.cluster import ClusterView, LocalView
from monolith.controller.controller import CheckpointController
from monolith.controller.settings import ControllerSettings
from monolith.controller.kube import KubeSettings, KubeView, api_client
from monolith.controller.servicer import SERVICE_NAME, ControllerServicer
from monolith.streams.config import SAMPLES_STREAM, add_streams_arguments, streams_config_from_args
from monolith.streams.pull_consumer import ConsumerAdmin, ConsumerSettings

_LOGGER = logging.getLogger("monolith.controller")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `monolith controller`."""
    parser.add_argument("--storage", "--checkpoint-url", dest="storage", required=True,
                        help="checkpoint storage: a directory or any fsspec URL")  # fmt: skip
    parser.add_argument("--embedding-ps", required=True, help="comma-separated host:port of every training shard, in order")
    parser.add_argument("--dense-ps", required=True, help="host:port of the dense-PS")
    parser.add_argument("--trainers", default="", help="comma-separated host:port of every online trainer's --control-port")
    parser.add_argument("--consumer", default="trainer", help="the trainers' durable consumer name")
    parser.add_argument("--interval", "--checkpoint-interval", dest="interval", type=positive_seconds, default=60.0, help="seconds between checkpoints (default 60)")
    parser.add_argument("--full-every", type=int, default=10, help="one full checkpoint every N (default 10)")
    parser.add_argument("--keep-full", type=int, default=2, help="full checkpoints kept, with their incrementals (default 2)")
    parser.add_argument("--watch-interval", type=positive_seconds, default=1.0,
                        help="seconds between health checks of every part (default 1)")  # fmt: skip
    kube = parser.add_argument_group("Kubernetes mode")
    kube.add_argument("--kubernetes", action="store_true",
                      help="watch the release's pods, elect one active controller with a Lease, record Events")  # fmt: skip
    kube.add_argument("--namespace", default="default", help="the release's namespace (default: default)")
    kube.add_argument("--selector", default="", help="label selector of the release's pods")
    kube.add_argument("--lease-holder", default=socket.gethostname(), help="this replica's identity (its pod name)")
    kube.add_argument("--lease-name", default="monolith-controller", help="the Lease's name (default monolith-controller)")
    kube.add_argument("--lease-duration", type=int, default=15, help="seconds a lease is held without renewal (default 15)")
    kube.add_argument("--trainer-control-port", type=int, default=0,
                      help="the trainer pods' --control-port: trainers are paused for cuts (default 0: none found)")  # fmt: skip
    kube.add_argument("--kubeconfig", default=None, help="a kubeconfig file instead of the in-cluster config")
    kube.add_argument("--kube-api", default=None, help="an API server URL without credentials (tests)")
    add_streams_arguments(parser, required=False)
    add_server_arguments(parser, port=50070, metrics_port=9097)


def _addresses(text: str) -> list[str]:
    return [a.strip() for a in text.split(",") if a.strip()]


def run(args: argparse.Namespace) -> int:
    """`monolith controller`: checkpoints and recovers the cluster until SIGTERM."""
    settings = parse_config(ControllerSettings, {
        "interval": args.interval, "full_every": args.full_every, "keep_full": args.keep_full,
        "watch_interval": args.watch_interval,
    })  # fmt: skip
    consumer = None
    if args.nats:
        consumer = ConsumerAdmin(streams_config_from_args(args), ConsumerSettings(SAMPLES_STREAM, "samples.>", args.consumer))
    controller = CheckpointController(CheckpointStore(args.storage), _addresses(args.embedding_ps), args.dense_ps,
                                      _addresses(args.trainers), consumer, settings)  # fmt: skip
    view: ClusterView = LocalView()
    if args.kubernetes:
        if not args.selector:
            raise ValueError("--kubernetes needs --selector (the release's pods)")
        kube_settings = KubeSettings(namespace=args.namespace, selector=args.selector, holder=args.lease_holder,
                                     lease_name=args.lease_name, lease_duration=args.lease_duration,
                                     renew_interval=max(1.0, args.lease_duration / 3),
                                     trainer_control_port=args.trainer_control_port)  # fmt: skip
        view = KubeView(api_client(args.kubeconfig, args.kube_api), kube_settings)
    servicer = ControllerServicer(controller)
    server = build_server(server_config_from_args(args),
                          [Service(SERVICE_NAME, lambda s: pb_grpc.add_ControllerServicer_to_server(servicer, s))])  # fmt: skip
    stop = threading.Event()
    # SERVING once the cluster is restored or adopted: the stack starts the trainers after that.
    server.start(serving=False)
    view.start()
    loop = threading.Thread(target=controller.run, args=(stop, lambda: server.set_serving(True), view),
                            name="controller", daemon=True)  # fmt: skip
    loop.start()
    _LOGGER.info("controller of %d training shard(s) and %d trainer(s), checkpoints in %s every %g s",
                 controller.num_shards, len(controller.trainer_addresses), args.storage, args.interval)  # fmt: skip

    def shut_down() -> None:
        stop.set()
        loop.join()
        view.close()
        controller.close()

    server.run_until_signal(on_shutdown=shut_down)
    return 0
