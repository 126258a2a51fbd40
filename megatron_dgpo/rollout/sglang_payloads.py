"""SGLang request bodies and response parsing as pure functions (no sglang import).

Field names follow SGLang 0.5.23's io_struct types: GenerateReqInput,
UpdateWeightsFromTensorReqInput, InitWeightsUpdateGroupReqInput,
UpdateWeightsFromDistributedReqInput, Release/ResumeMemoryOccupationReqInput. The contract
tests (tests/test_sglang_contract.py) post every body built here to SGLang's own FastAPI app and
check each key against those types, so a renamed or dropped field fails in CI.
"""
from __future__ import annotations

import secrets
from typing import Any, Iterable, Iterator, Optional

import torch

from .base import RolloutSample, SamplingParams

# sglang.srt.constants: GPU_MEMORY_TYPE_KV_CACHE / _WEIGHTS / _CUDA_GRAPH
WEIGHT_TAGS = ("weights", "kv_cache", "cuda_graph")


class SGLangResponseError(RuntimeError):
    pass


class SGLangServerUnavailable(SGLangResponseError):
    """A server could not be reached (refused, reset, 500/502-504) after the retries."""


def sampling_params_dict(sp: SamplingParams, seed: Optional[int], max_new_tokens: Optional[int] = None) -> dict:
    d: dict[str, Any] = {
        "max_new_tokens": sp.max_new_tokens if max_new_tokens is None else int(max_new_tokens),
        "temperature": max(sp.temperature, 0.0),  # SGLang treats 0 as greedy
        "top_p": sp.top_p,
        "top_k": sp.top_k if sp.top_k > 0 else -1,
        # keep special tokens in the outputs: the trainer needs the exact ids (eos included)
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if sp.stop_token_ids:
        d["stop_token_ids"] = list(sp.stop_token_ids)
    if seed is not None:
        # honoured by SGLang only with --enable-deterministic-inference
        d["sampling_seed"] = int(seed)
    return d


def row_seeds(sp: SamplingParams, n_rows: int, deterministic: bool) -> list[Optional[int]]:
    """Per-row sampling seeds. Without --enable-deterministic-inference SGLang ignores
    `sampling_seed`, so none is sent; with it, a row without a seed gets the server's one default
    seed (every sample of a group identical), so every row gets its own: sp.seed + row, or a
    random base when the caller set no seed."""
    if not deterministic:
        return [None] * n_rows
    base = sp.seed if sp.seed is not None else secrets.randbelow(1 << 31)
    return [(base + k) % (1 << 63) for k in range(n_rows)]


def build_generate_payload(prompt_token_ids: list[list[int]], sp: SamplingParams, *,
                           deterministic: bool = False,
                           max_new_tokens: Optional[list[int]] = None) -> dict:
    """One request row per sample (prompt repeated n times, prompt-major), n=1 each.

    Repeating rows instead of SGLang's `n` pins the output order to ours and lets each row get
    its own seed; the radix cache still computes each shared prompt once. `max_new_tokens`:
    one limit per prompt (clamped to the server's context length by the caller).
    """
    rows = [list(p) for p in prompt_token_ids for _ in range(sp.n)]
    seeds = row_seeds(sp, len(rows), deterministic)
    limits = [None] * len(rows) if max_new_tokens is None else [m for m in max_new_tokens for _ in range(sp.n)]
    params = [sampling_params_dict(sp, seeds[k], limits[k]) for k in range(len(rows))]
    return {
        "input_ids": rows,
        "sampling_params": params,
        "return_logprob": True,
        "logprob_start_len": -1,  # output tokens only
        "stream": False,
    }


def _finish_reason(meta: dict) -> str:
    fr = meta.get("finish_reason")
    kind = fr.get("type") if isinstance(fr, dict) else fr
    if kind in ("stop", "length", "abort"):
        return kind
    raise SGLangResponseError(f"unexpected finish_reason {fr!r}")


def failed_sample(prompt_index: int, prompt_ids: list[int], version: str) -> RolloutSample:
    """What an aborted or refused row becomes: no response tokens (so no loss tokens), finish
    reason "abort"; the reward stage gives it reward 0 and counts it."""
    return RolloutSample(prompt_index, list(prompt_ids), [], [], "abort", version)


def parse_generate_response(resp: Any, prompt_token_ids: list[list[int]], sp: SamplingParams,
                            expected_version: Optional[str] = None) -> list[RolloutSample]:
    """SGLang /generate (or Engine.generate) output -> RolloutSamples, checked for consistency.

    A row SGLang aborted (finish_reason {"type": "abort", "status_code": ...}, e.g. by
    /abort_request or a scheduler-side limit) becomes a failed sample instead of failing the batch.
    """
    items = resp if isinstance(resp, list) else [resp]
    n_rows = len(prompt_token_ids) * sp.n
    if len(items) != n_rows:
        raise SGLangResponseError(f"expected {n_rows} outputs, got {len(items)}")
    out = []
    for k, item in enumerate(items):
        pi = k // sp.n
        meta = item.get("meta_info") or {}
        version = str(meta.get("weight_version"))
        if _finish_reason(meta) == "abort":
            out.append(failed_sample(pi, prompt_token_ids[pi], version))
            continue
        ids = item.get("output_ids")
        lps = meta.get("output_token_logprobs")
        if ids is None or lps is None:
            raise SGLangResponseError(f"output {k} lacks output_ids or meta_info.output_token_logprobs "
                                      "(was return_logprob sent?)")
        # entries are (logprob, token_id, text-or-None)
        lp_ids = [int(e[1]) for e in lps]
        if lp_ids != list(ids):
            raise SGLangResponseError(f"output {k}: logprob token ids disagree with output_ids")
        if expected_version is not None and version != expected_version:
            raise SGLangResponseError(f"output {k} came from weight_version {version!r}, "
                                      f"expected {expected_version!r}")
        out.append(RolloutSample(pi, list(prompt_token_ids[pi]), [int(t) for t in ids],
                                 [float(e[0]) for e in lps], _finish_reason(meta), version))
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_update_from_tensor_payload(serialized_per_rank: list, version: Optional[str],
                                     flush_cache: bool, load_format: Optional[str] = "flattened_bucket") -> dict:
    return {
        "serialized_named_tensors": list(serialized_per_rank),
        "load_format": load_format,
        "flush_cache": flush_cache,
        "weight_version": version,
    }


def build_init_group_payload(master_address: str, master_port: int, rank_offset: int, world_size: int,
                             group_name: str = "weight_update_group", backend: str = "nccl") -> dict:
    return {"master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend}


def build_update_from_distributed_payload(named_tensors: list[tuple[str, torch.Tensor]], group_name: str,
                                          flush_cache: bool, version: Optional[str],
                                          load_format: Optional[str] = "flattened_bucket") -> dict:
    """`load_format="flattened_bucket"`: the servers receive the whole bucket as one uint8
    broadcast (`flatten_bucket`), instead of one broadcast per tensor."""
    return {
        "names": [n for n, _ in named_tensors],
        "dtypes": [dtype_name(t.dtype) for _, t in named_tensors],
        "shapes": [list(t.shape) for _, t in named_tensors],
        "group_name": group_name,
        "flush_cache": flush_cache,
        "weight_version": version,
        "load_format": load_format,
    }


def flatten_bucket(named_tensors: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """The bytes SGLang's receiver expects for a flattened bucket: each tensor's bytes in order,
    no padding (sglang.srt.weight_sync.tensor_bucket.FlattenedTensorBucket.empty allocates
    sum(numel * itemsize) uint8 and refuses a tensor whose byte offset is not a multiple of its
    itemsize; buckets hold one dtype, so offsets always are)."""
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for _, t in named_tensors])


def build_memory_payload(tags: Optional[Iterable[str]]) -> dict:
    if tags is None:
        return {"tags": None}
    tags = list(tags)
    bad = [t for t in tags if t not in WEIGHT_TAGS]
    if bad:
        raise ValueError(f"unknown memory tag(s) {bad}; SGLang knows {list(WEIGHT_TAGS)}")
    return {"tags": tags}


def with_last(it: Iterable) -> Iterator[tuple[Any, bool]]:
    """(item, is_last) pairs; the last weight bucket carries flush_cache and the version."""
    it = iter(it)
    try:
        prev = next(it)
    except StopIteration:
        # the last bucket carries the version: an empty update could never set it
        raise ValueError("update_weights got no tensors") from None
    for x in it:
        yield prev, False
        prev = x
    yield prev, True


def bucket_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
                         ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group consecutive tensors into buckets of at most `bucket_bytes` (a bigger tensor gets a
    bucket of its own), one dtype per bucket: a flattened bucket is a single 1-D tensor."""
    cur: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if cur and (size + nbytes > bucket_bytes or t.dtype != cur[0][1].dtype):
            yield cur
            cur, size = [], 0
        cur.append((name, t))
        size += nbytes
    if cur:
        yield cur
