"""``prune-serve BUNDLE [BUNDLE ...]``: the OpenAI-compatible server on uvicorn, or (``--ray``) the same app as a
Ray Serve deployment. Every bundle and its sessions are loaded before the port opens; a bad option or bundle is one
line and exit 2. uvicorn drains in-flight requests on SIGTERM before it exits."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from vlmprune.cli_common import HelpFormatter, main_wrapper, require_extra
from vlmprune.errors import VlmpruneError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prune-serve", formatter_class=HelpFormatter,
                                description="Serve bundles over HTTP in the OpenAI chat-completions format.")
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle folders (the model id is the folder name)")
    p.add_argument("--name", action="append", default=[], help="model id for each BUNDLE in order (repeat)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-concurrency", type=int, default=1,
                   help="requests generating at once (one pipeline each, all loaded at start)")
    p.add_argument("--max-queue", type=int, default=4, help="requests waiting beyond those; more get 429")
    p.add_argument("--cache-mb", type=float, default=256.0,
                   help="bound of the vision-output and KV-prefix caches together (0: no caching)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request, queue wait included")
    p.add_argument("--max-body-mb", type=float, default=32.0)
    p.add_argument("--max-image-mb", type=float, default=20.0)
    p.add_argument("--max-image-pixels", type=int, default=40_000_000)
    p.add_argument("--allow-image-dir", action="append", default=[], type=Path,
                   help="folder whose image files requests may name (file:// or a path); none by default")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per session")
    p.add_argument("--provider", help="ONNX Runtime provider (cpu, cuda, ...)")
    p.add_argument("--verify", default="quick", choices=["quick", "full"])
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    ray = p.add_argument_group("Ray Serve")
    ray.add_argument("--ray", action="store_true", help="deploy the app on Ray Serve instead of uvicorn")
    ray.add_argument("--replicas", type=int, default=1)
    ray.add_argument("--ray-address", help="an existing cluster (default: start a local one)")
    ray.add_argument("--autoscaling", metavar="JSON",
                     help="Ray Serve's autoscaling_config, passed through (e.g. '{\"min_replicas\": 1, "
                          "\"max_replicas\": 4}'); replaces --replicas")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="num_cpus per replica")
    ray.add_argument("--run-seconds", type=float, help=argparse.SUPPRESS)  # tests: stop by themselves
    return p


def build(args):
    from .serve_engine import ServeConfig
    from .serve_openai import Limits

    for folder in args.bundles:
        if not Path(folder).is_dir():
            raise VlmpruneError(f"bundle {folder} is not a folder", "give the folder prune-export wrote")
    if not 0 < args.port < 65536:
        raise VlmpruneError(f"--port {args.port} is outside 1..65535", "give e.g. --port 8000")
    dirs = []
    for d in args.allow_image_dir:
        if not d.is_dir():
            raise VlmpruneError(f"--allow-image-dir {d} is not a folder", "give an existing folder")
        dirs.append(Path(os.path.realpath(d)))
    for flag, value in (("--max-body-mb", args.max_body_mb), ("--max-image-mb", args.max_image_mb),
                        ("--max-image-pixels", args.max_image_pixels)):
        if not value > 0:
            raise VlmpruneError(f"{flag} {value} must be positive", f"give a positive {flag}")
    config = ServeConfig(bundles=list(args.bundles), max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                         cache_mb=args.cache_mb, request_timeout=args.request_timeout, threads=args.threads,
                         provider=args.provider, verify=args.verify, names=list(args.name))
    config.check()
    limits = Limits(max_image_bytes=int(args.max_image_mb * 2**20), max_image_pixels=args.max_image_pixels,
                    image_dirs=dirs)
    return config, limits, int(args.max_body_mb * 2**20)


@main_wrapper("prune-serve")
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    require_extra("prune-serve", "serve", "fastapi", "uvicorn", "prometheus_client")
    config, limits, max_body = build(args)
    if args.ray:
        autoscaling = None
        if args.autoscaling:
            try:
                autoscaling = json.loads(args.autoscaling)
            except ValueError:
                raise VlmpruneError("--autoscaling is not JSON", "give e.g. '{\"min_replicas\": 1}'") from None
            if not isinstance(autoscaling, dict):
                raise VlmpruneError("--autoscaling is not a JSON object", "give e.g. '{\"min_replicas\": 1}'")
        if args.replicas < 1:
            raise VlmpruneError(f"--replicas {args.replicas} must be at least 1", "give e.g. --replicas 2")
        require_extra("prune-serve --ray", "ray", "ray.serve")
        from .serve_ray import run_ray

        return run_ray(config, limits, max_body, host=args.host, port=args.port, replicas=args.replicas,
                       address=args.ray_address, autoscaling=autoscaling, replica_cpus=args.replica_cpus,
                       run_seconds=args.run_seconds)
    import uvicorn

    from .serve_app import create_app, make_state
    from .serve_engine import Engine
    from .serve_metrics import Metrics

    metrics = Metrics()
    engine = Engine(config, on_event=metrics.cache_event)  # every pipeline and session, before the port opens
    state = make_state(engine, limits, metrics, max_body)
    app = create_app(lambda: state)
    print(f"prune-serve: {', '.join(engine.bundles)} on http://{args.host}:{args.port}/v1 "
          f"({config.max_concurrency} running, {config.max_queue} queued, cache {config.cache_mb:g} MB)", flush=True)
    # SIGTERM/SIGINT: uvicorn stops accepting and waits for the requests in flight (bounded by the timeout), then
    # restores the handlers it found and raises the signal again: this handler makes that SIGTERM a clean exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=int(config.request_timeout) + 5)
    finally:
        engine.close()
    print("prune-serve: drained and stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
