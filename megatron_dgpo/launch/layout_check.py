"""Launcher-side check that a job's parallel layout fits its allocation, before anything is
submitted (a layout that cannot fit would otherwise render a job that dies on the cluster).

`check_layout(cfg, nodes, gpus_per_node)` raises ValueError naming the keys: TP x PP must divide
the trainer's GPUs (nodes x GPUs per node), TP must divide the attention heads and divide or be a
multiple of the KV heads, the layers must split over the PP stages (evenly, or as the first/last
stage counts say). Meant to be called from `launch.spec.validate` with the trainer's Slurm spec.
"""
from __future__ import annotations

from megatron_dgpo.config_checks import check_model_layout


def check_layout(cfg, nodes: int, gpus_per_node: int) -> None:
    p = cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    gpus = nodes * gpus_per_node
    if gpus % (tp * pp):
        raise ValueError(f"parallel.tensor_model_parallel_size={tp} x parallel.pipeline_model_parallel_size={pp} "
                         f"= {tp * pp} does not divide the {gpus} trainer GPUs ({nodes} nodes x {gpus_per_node})")
    check_model_layout(cfg.model, tp, pp, p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage)
