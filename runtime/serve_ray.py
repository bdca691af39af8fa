"""``prune-serve --ray``: the same ASGI app as a Ray Serve deployment (``serve.ingress`` with an app builder, run on
each replica after its constructor loaded the bundles). Replicas, routing, health checks and autoscaling are Ray
Serve's; a replica asks for a GPU (``num_gpus``) when this machine has one. Imported only under ``--ray``."""

from __future__ import annotations

import os
import signal
import socket
import threading
from dataclasses import replace
from pathlib import Path

from ray import serve

from .serve_app import ServeState, create_app, make_state
from .serve_engine import Engine, ServeConfig
from .serve_metrics import Metrics
from .serve_openai import Limits

_STATE: ServeState | None = None  # one replica per process: its state, set by the constructor


def _state() -> ServeState:
    return _STATE


def build_app():
    """Evaluated on the replica after ``Replica.__init__`` (Ray Serve's ingress builder)."""
    return create_app(_state)


@serve.ingress(build_app)
class Replica:
    def __init__(self, config: ServeConfig, limits: Limits, max_body: int):
        global _STATE
        metrics = Metrics()
        engine = Engine(config, on_event=metrics.cache_event)
        state = make_state(engine, limits, metrics, max_body)
        state.replica = f"{socket.gethostname()}:{os.getpid()}"
        _STATE = state


def run_ray(config: ServeConfig, limits: Limits, max_body: int, *, host: str, port: int, replicas: int,
            address: str | None, autoscaling: dict | None, replica_cpus: float, run_seconds: float | None) -> int:
    import ray

    from .gpu import detect_environment

    # the replicas run elsewhere (other folders, other nodes of a shared file system): absolute paths
    config = replace(config, bundles=[str(Path(b).resolve()) for b in config.bundles])
    limits = replace(limits, image_dirs=[Path(d).resolve() for d in limits.image_dirs])
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    # one HTTP proxy, on the head node: nodes that share a host (a test's loopback cluster) would fight for the port
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    options = {"name": "vlmprune",
               "ray_actor_options": {"num_cpus": replica_cpus,
                                     "num_gpus": 1 if detect_environment().gpu.present else 0},
               # Ray's router sends a replica no more than its own admission takes
               "max_ongoing_requests": config.max_concurrency + config.max_queue}
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(Replica, **options)
    serve.run(deployment.bind(config, limits, max_body), name="vlmprune", route_prefix="/")
    print(f"prune-serve: Ray Serve on http://{host}:{port}/v1 ({'autoscaling' if autoscaling else replicas} "
          f"replicas)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait(run_seconds)
    serve.shutdown()  # each replica drains within Ray Serve's graceful_shutdown_timeout_s
    ray.shutdown()
    print("prune-serve: drained and stopped", flush=True)
    return 0
