"""prune-serve --ray on a local Ray cluster: a head node and one worker node started as processes on 127.0.0.1
(``ray start --block``, so each stops with its own process), two replicas, and requests answered by both.
Reference: Ray Serve's documented ``serve.ingress`` deployment. Marked ``ray`` (minutes): ``.ci/run`` runs it as a
second pytest call; the default run leaves it out."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")

from serve_helpers import free_port, image, user  # noqa: E402

pytestmark = pytest.mark.ray


# Ray's proxy prefers replicas on its own node; on one loopback host that would send every request to the head's
# replica, so the preference is turned off (Ray Serve's documented environment variable) for the whole cluster.
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
       "VLMPRUNE_SPIN": "0"}


def _ray(*args: str) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("ray")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
    return subprocess.Popen([*cmd, *args, "--block"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV, start_new_session=True)


def _stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the node's processes when it is stopped
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what this test started
            proc.wait(10)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from vlmprune.export.exporter import ExportRequest, export_bundle
    from vlmprune.export.progress import Steps

    return export_bundle(ExportRequest(model="tiny-llava", method="fopru", keeps=[0.25],
                                       out=tmp_path_factory.mktemp("ray") / "llava"), Steps(quiet=True)).path


def test_two_replicas_on_a_head_and_a_worker_node_both_answer(bundle):
    temp = tempfile.mkdtemp(prefix="r25-", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    gcs = free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", str(100 * 2**20),
              "--disable-usage-stats"]
    head = _ray("start", "--head", "--port", str(gcs), "--include-dashboard", "false", "--temp-dir", temp, *common)
    worker = serve = None
    try:
        worker = _ray("start", "--address", f"127.0.0.1:{gcs}", *common)
        port = free_port()
        serve = subprocess.Popen([sys.executable, "-m", "vlmprune.runtime.serve_cli", str(bundle), "--ray",
                                  "--replicas", "2", "--ray-address", f"127.0.0.1:{gcs}", "--host", "127.0.0.1",
                                  "--port", str(port), "--replica-cpus", "1", "--run-seconds", "600"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                 env=ENV)
        url = f"http://127.0.0.1:{port}"
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(serve.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 300
        # serve.run returned (every replica running) when prune-serve prints its address
        while not any("Ray Serve on" in line for line in lines):
            assert serve.poll() is None, serve.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "prune-serve --ray did not deploy in 300 s"
            time.sleep(1)
        assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"
        replicas, answers = set(), set()
        body = {"model": "llava", "messages": [user("What is it?", image(5))], "max_tokens": 6, "temperature": 0,
                "ignore_eos": True}

        async def burst():
            async with httpx.AsyncClient(timeout=120) as c:
                return await asyncio.gather(*(c.post(f"{url}/v1/chat/completions", json=body) for _ in range(4)))

        for _ in range(20):  # bursts of 4 concurrent requests, bounded; Ray's router spreads them
            for r in asyncio.run(burst()):
                assert r.status_code in (200, 429), r.text
                if r.status_code == 200:
                    assert r.json()["usage"]["completion_tokens"] == 6
                    replicas.add(r.headers["X-Vlmprune-Replica"])
                    answers.add(r.json()["choices"][0]["message"]["content"])
            if len(replicas) == 2:
                break
        assert len(replicas) == 2, replicas
        assert len(answers) == 1  # the same bundle on both: the same greedy answer
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(120) == 0
        reader.join(30)
        assert any("drained and stopped" in line for line in lines)
    finally:
        for proc in (serve, worker, head):
            if proc is not None:
                _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)
