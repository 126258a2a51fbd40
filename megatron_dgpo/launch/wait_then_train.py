#!/usr/bin/env python
"""Trainer entry of a disaggregated job: wait for the SGLang servers, then run train_dgpo.py.

    torchrun ... megatron_dgpo/launch/wait_then_train.py [--timeout S] -- --config X.yaml key=value ...

Reads the server URLs (DGPO_SGLANG_URLS, comma separated) that the sbatch script exported,
polls every server's /health until it answers 200 (or the timeout passes: exit 2), appends
`rollout.sglang.server_urls=[...]` to the arguments and runs examples/train_dgpo.py in this
process (same torchrun rank). The weight-broadcast rendezvous address is NOT taken from the
job's first node: torchrun's c10d rendezvous may make any node global rank 0, so rank 0 uses its
own host name (megatron_dgpo.rollout.sglang_engine.trainer_host_address).
"""
from __future__ import annotations

import os
import runpy
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ENV_SERVER_URLS = "DGPO_SGLANG_URLS"
TRAIN = Path(__file__).resolve().parents[2] / "examples" / "train_dgpo.py"


# Servers are cluster-internal: never route the health checks through an HTTP(S) proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def healthy(url: str, timeout: float = 5.0) -> bool:
    try:
        with _OPENER.open(url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_for(urls: list[str], timeout_s: float, poll_s: float = 10.0) -> list[str]:
    """Block until every URL is healthy; return the ones still down when the timeout passed."""
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    while pending:
        pending = [u for u in pending if not healthy(u)]
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        time.sleep(min(poll_s, left))
    return pending


def extra_overrides(env=os.environ) -> list[str]:
    urls = [u for u in env.get(ENV_SERVER_URLS, "").split(",") if u]
    out = []
    if urls:
        out.append("rollout.sglang.server_urls=[" + ",".join(urls) + "]")
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    timeout_s = 3600.0
    if argv[:1] == ["--timeout"]:
        timeout_s, argv = float(argv[1]), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    urls = [u for u in os.environ.get(ENV_SERVER_URLS, "").split(",") if u]
    rank = os.environ.get("RANK", "0")
    if urls:
        print(f"[rank {rank}] waiting for {len(urls)} SGLang server(s): {urls}", flush=True)
        down = wait_for(urls, timeout_s)
        if down:
            print(f"[rank {rank}] SGLang servers not healthy after {timeout_s:.0f}s: {down}", file=sys.stderr)
            return 2
    sys.argv = [str(TRAIN)] + argv + extra_overrides()
    runpy.run_path(str(TRAIN), run_name="__main__")  # train_dgpo.py ends with sys.exit(main())
    return 0


if __name__ == "__main__":
    sys.exit(main())
