"""`monolith joiner`: the sample-joiner process."""

from __future__ import annotations

import argparse
import logging

from monolith.api.joiner.v1 import joiner_pb2_grpc as pb_grpc
from monolith.common.config import parse_config, seconds
from monolith.common.server import (
    MonolithServer,
    ServerConfig,
    Service,
    add_server_arguments,
    build_server,
    server_config_from_args,
)
from monolith.joiner import metrics
from monolith.joiner.config import JoinerConfig
from monolith.joiner.runtime import JoinerRuntime, owned_partitions
from monolith.joiner.servicer import SERVICE_NAME, SampleJoinerServicer
from monolith.model.config import default_config_path, load_model_config
from monolith.streams.config import add_streams_arguments, streams_config_from_args

_LOGGER = logging.getLogger("monolith.joiner")


def build_joiner(runtime: JoinerRuntime, server_config: ServerConfig) -> MonolithServer:
    """An unstarted ReportActions server over `runtime`."""
    servicer = SampleJoinerServicer(runtime)
    return build_server(
        server_config, [Service(SERVICE_NAME, lambda s: pb_grpc.add_SampleJoinerServicer_to_server(servicer, s))]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `monolith joiner`."""
    defaults = JoinerConfig()
    parser.add_argument("--config", default=default_config_path(),
                        help="model config YAML (its training.negative_sample_rate is the default rate)")  # fmt: skip
    add_streams_arguments(parser)
    parser.add_argument("--window", type=seconds, default=defaults.window,
                        help=f"event-time seconds an impression waits for a positive action (default {defaults.window:g})")  # fmt: skip
    parser.add_argument("--lateness", type=seconds, default=defaults.lateness,
                        help=f"event-time seconds events may arrive out of order (default {defaults.lateness:g})")  # fmt: skip
    parser.add_argument("--negative-sample-rate", type=float, default=None,
                        help="fraction of negatives kept (default: the model config's training.negative_sample_rate)")  # fmt: skip
    parser.add_argument("--action-kinds", default=",".join(defaults.action_kinds),
                        help=f"comma-separated action kinds ReportActions accepts (default {','.join(defaults.action_kinds)})")  # fmt: skip
    parser.add_argument("--negative-kinds", default=",".join(defaults.negative_kinds),
                        help="comma-separated action kinds that are explicit negatives (a skip, a dislike): each decides "
                        f"its key negative at once, with no window wait (default {','.join(defaults.negative_kinds)}; "
                        "empty: none)")  # fmt: skip
    parser.add_argument("--quality-window", type=int, default=defaults.quality_window,
                        help="the last samples published that the served model's AUC, calibration and positive rate "
                        f"(the monolith_joiner_served_auc, _calibration_ratio and _positive_rate gauges) are computed over (default {defaults.quality_window:,})")  # fmt: skip
    parser.add_argument("--replica-index", type=int, default=0, help="this replica's index (it joins partitions p with p %% replicas == index)")
    parser.add_argument("--replicas", type=int, default=1, help="joiner replicas sharing the partitions")
    add_server_arguments(parser, port=8600, metrics_port=9106, tls=True)


def run(args: argparse.Namespace) -> int:
    """Joins and serves ReportActions until SIGTERM."""
    model = load_model_config(args.config)
    rate = model.training.negative_sample_rate if args.negative_sample_rate is None else args.negative_sample_rate
    config = parse_config(
        JoinerConfig,
        {
            "window": args.window,
            "lateness": args.lateness,
            "negative_sample_rate": rate,
            "action_kinds": [k.strip() for k in args.action_kinds.split(",") if k.strip()],
            "negative_kinds": [k.strip() for k in args.negative_kinds.split(",") if k.strip()],
            "quality_window": args.quality_window,
        },
    )
    if rate != model.training.negative_sample_rate:
        _LOGGER.warning(
            "negative sample rate %g differs from the model config's %g, which model-serving corrects for",
            rate, model.training.negative_sample_rate,
        )  # fmt: skip
    streams = streams_config_from_args(args)
    partitions = owned_partitions(streams.partitions, args.replica_index, args.replicas)
    runtime = JoinerRuntime(streams, config, partitions)
    metrics.export_quality(runtime.quality)
    server = build_joiner(runtime, server_config_from_args(args))
    server.start(serving=False)  # SERVING once connected to NATS with the streams set up
    runtime.start(on_ready=lambda: server.set_serving(True))
    _LOGGER.info("joiner on port %d, NATS at %s, partitions %s", server.port, streams.url, partitions)
    server.run_until_signal(on_shutdown=runtime.stop)
    return 0
