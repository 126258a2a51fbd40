"""Launch a worker script under torchrun once and collect its JSON results.

A torchrun launch costs ~12 s of imports on 2 cores, so each worker script runs many checks
in one launch and writes `{check_name: {"ok": bool, ...}}` to the file named by --out; tests
then parametrize over the check names against a module-scoped fixture.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

WORKERS = Path(__file__).parent / "workers"
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(worker: str, nproc: int, *args: str, timeout: int = 600) -> dict:
    """Run tests/workers/<worker> on `nproc` CPU processes (gloo); return rank 0's JSON results."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
            str(WORKERS / worker), "--out", str(out), *args,
        ]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"torchrun {worker} (nproc={nproc}) failed with rc={proc.returncode}\n"
                f"--- stdout ---\n{proc.stdout[-8000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
            )
        return json.loads(out.read_text())
