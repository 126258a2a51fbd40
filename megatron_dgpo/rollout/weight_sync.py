"""A process group between trainer rank 0 and an inference server's ranks, outside the
trainer's default group (the server is not part of torchrun's world).

It is built the way SGLang builds its side for /init_weights_update_group: a TCP rendezvous at
master_address:master_port, the store prefixed by the group name, one new process group.
`_new_process_group_helper` is private torch API; its option keyword changed name across
versions (pg_options -> backend_options), hence the signature probe.
"""
from __future__ import annotations

import inspect
from datetime import timedelta


def init_weight_sync_process_group(master_address: str, master_port: int, world_size: int, rank: int = 0,
                                   group_name: str = "weight_update_group", backend: str = "nccl",
                                   timeout: timedelta = timedelta(minutes=10)):
    from torch.distributed import distributed_c10d as c10d

    store, rank, world_size = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}",
                                                   rank=rank, world_size=world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    params = inspect.signature(c10d._new_process_group_helper).parameters
    kw = {"group_name": group_name, "timeout": timeout}
    kw["backend_options" if "backend_options" in params else "pg_options"] = None
    pg = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store, **kw)
    pg = pg[0] if isinstance(pg, tuple) else pg
    # lets dist.broadcast(..., group=pg) translate group ranks without a default group
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg
