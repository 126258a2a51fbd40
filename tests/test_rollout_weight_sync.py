"""The trainer-side weight-sync group, formed with gloo on CPU against a peer process that plays
the inference server's rank (on GPUs both sides use NCCL)."""
import multiprocessing as mp
import socket

import torch
import torch.distributed as dist

from megatron_dgpo.rollout.weight_sync import init_weight_sync_process_group


def _peer(port, q):
    pg = init_weight_sync_process_group("127.0.0.1", port, 2, rank=1, group_name="weight_update_group",
                                        backend="gloo")
    t = torch.zeros(2, 3)
    dist.broadcast(t, src=0, group=pg)
    q.put(t.tolist())


def test_group_broadcast_to_peer():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peer, args=(port, q), daemon=True)
    p.start()
    try:
        pg = init_weight_sync_process_group("127.0.0.1", port, 2, rank=0, backend="gloo")
        src = torch.arange(6.0).view(2, 3)
        dist.broadcast(src, src=0, group=pg)
        assert q.get(timeout=60) == src.tolist()
        assert not dist.is_initialized()  # the trainer's default group is untouched
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
