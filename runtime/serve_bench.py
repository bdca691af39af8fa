"""``python -m vlmprune.runtime.serve_bench BUNDLE``: the figures of README "Serve", rerunnable.

1. The follow-up row: TTFT of a first question about an image and of a second question about the same image, in
   one process with the server's caches (vision outputs, KV prefix), median over several images; and the first
   question without caches for reference.
2. Load: ``prune-serve`` started on 127.0.0.1, then 1, 2 and 4 concurrent clients (httpx, streaming), each sending
   requests one after another with a new image each: requests per second and p95 TTFT (to the first content chunk,
   as the client sees it).

Torch-free; needs the serve extra and httpx."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

import numpy as np

from vlmprune.cli_common import HelpFormatter, main_wrapper
from vlmprune.errors import VlmpruneError

QUESTIONS = ("What is in the image?", "Which colours does it have?")


def _image(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((336, 448, 3)) * 255).astype("uint8"))


def follow_up(bundle: str, images: int, keep: float | None, max_tokens: int) -> dict:
    from .reuse import ByteLRU, Reuse
    from .serve_engine import open_served

    pipe = open_served(bundle)
    plain = []
    for i in range(images + 1):  # the first one warms the sessions
        r = pipe.generate(_image(1000 + i), QUESTIONS[0], keep=keep, max_new_tokens=max_tokens)
        plain.append(r.timings.ttft_ms)
    pipe.reuse = Reuse(ByteLRU(512 << 20), "bench")
    first, second, reused = [], [], []
    pipe.generate(_image(999), QUESTIONS[0], keep=keep, max_new_tokens=max_tokens)  # warm, and the template prefix
    for i in range(images):
        img = _image(i)
        a = pipe.generate(img, QUESTIONS[0], keep=keep, max_new_tokens=max_tokens)
        b = pipe.generate(img, QUESTIONS[1], keep=keep, max_new_tokens=max_tokens)
        first.append(a.timings.ttft_ms)
        second.append(b.timings.ttft_ms)
        reused.append(pipe.reuse.reused)
    row = {"bucket": a.bucket, "keep": a.keep, "prompt_tokens": b.prompt_tokens, "reused_tokens": min(reused),
           "ttft_no_cache_ms": statistics.median(plain[1:]), "ttft_first_ms": statistics.median(first),
           "ttft_follow_up_ms": statistics.median(second)}
    row["follow_up_over_first"] = row["ttft_follow_up_ms"] / row["ttft_first_ms"]
    return row


async def _client(url: str, model: str, seeds: list[int], max_tokens: int, ttfts: list, codes: list):
    import base64
    import io

    import httpx

    async with httpx.AsyncClient(timeout=300) as c:
        for seed in seeds:
            buf = io.BytesIO()
            _image(seed).save(buf, "PNG")
            uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                              {"type": "text", "text": QUESTIONS[0]}]}]}
            t0 = time.perf_counter()
            first = None
            async with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                codes.append(r.status_code)
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: {") and '"content":"' in line \
                            and '"content":""' not in line:
                        first = time.perf_counter() - t0
            if first is not None:
                ttfts.append(first * 1e3)


def load(bundle: str, clients: list[int], requests: int, max_tokens: int, concurrency: int, keep: float | None) -> list:
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vlmprune.runtime.serve_cli", bundle, "--port", str(port), "--max-concurrency",
           str(concurrency), "--max-queue", str(max(clients) * 2), "--cache-mb", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise VlmpruneError(f"prune-serve exited: {proc.stderr.read()[-300:]}", "check the bundle")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise VlmpruneError("prune-serve did not start in 300 s", "check the bundle")
            time.sleep(0.3)
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        model = f"{model}@{keep}" if keep is not None else model
        asyncio.run(_client(url, model, [5000, 5001], max_tokens, [], []))  # warm-up
        rows = []
        for n in clients:
            ttfts, codes = [], []
            seeds = [[10_000 * n + 100 * c + i for i in range(requests)] for c in range(n)]
            t0 = time.perf_counter()

            async def run_all():
                await asyncio.gather(*(_client(url, model, s, max_tokens, ttfts, codes) for s in seeds))

            asyncio.run(run_all())
            wall = time.perf_counter() - t0
            ok = codes.count(200)
            rows.append({"clients": n, "requests": len(codes), "ok": ok, "requests_per_s": ok / wall,
                         "p95_ttft_ms": float(np.percentile(ttfts, 95)) if ttfts else None,
                         "median_ttft_ms": statistics.median(ttfts) if ttfts else None})
        return rows
    finally:
        proc.terminate()
        proc.wait(60)


def _parser():
    p = argparse.ArgumentParser(prog="python -m vlmprune.runtime.serve_bench", formatter_class=HelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--keep", type=float, default=None, help="bucket (default: the most pruned)")
    p.add_argument("--images", type=int, default=10, help="images for the follow-up row (median)")
    p.add_argument("--clients", default="1,2,4")
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-concurrency", type=int, default=2, help="prune-serve's, for the load rows")
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--json", help="write the figures here")
    return p


@main_wrapper("serve_bench")
def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        raise VlmpruneError(f"--clients {args.clients!r} is not a list of integers", "give e.g. 1,2,4") from None
    row = follow_up(args.bundle, args.images, args.keep, args.max_tokens)
    print(f"follow-up ({row['bucket']}, keep {row['keep']}): TTFT first {row['ttft_first_ms']:.1f} ms, follow-up "
          f"{row['ttft_follow_up_ms']:.1f} ms, ratio {row['follow_up_over_first']:.3f} (no cache: "
          f"{row['ttft_no_cache_ms']:.1f} ms; {row['reused_tokens']} of {row['prompt_tokens']} prompt tokens reused)")
    rows = [] if args.skip_load else load(args.bundle, clients, args.requests, args.max_tokens,
                                          args.max_concurrency, args.keep)
    if rows:
        print("| clients | requests | req/s | median TTFT ms | p95 TTFT ms |")
        print("|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['clients']} | {r['ok']}/{r['requests']} | {r['requests_per_s']:.2f} | "
                  f"{r['median_ttft_ms']:.1f} | {r['p95_ttft_ms']:.1f} |")
    if args.json:
        from pathlib import Path

        from vlmprune.atomic import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps({"follow_up": row, "load": rows}, indent=2))
    return 0


if __name__ == "__main__":
    main()
