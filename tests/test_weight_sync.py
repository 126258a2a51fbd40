"""Single-process tests of the weight_sync rules, stream, integrity check and HF folder I/O.

The Megatron side is a {megatron name: tensor} mapping here (what a TP=PP=1 GPTModel holds);
the torchrun tests (test_weight_sync_dist.py) use real GPTModels in TP/PP layouts.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from weight_sync_common import (  # noqa: E402
    VARIANTS, hf_state, reference_inference_shards, save_hf_model, tiny_config,
)

from megatron_dgpo.model.config import ModelConfig  # noqa: E402
from megatron_dgpo.weight_sync import (  # noqa: E402
    CheckpointError, HFCheckpoint, WeightStreamer, WeightSyncError, WeightSyncIntegrityError, check_hf_tensors,
    get_layout, hf_tensor_names, iter_hf_weights, megatron_state_from_hf, write_hf_folder,
)
from megatron_dgpo.weight_sync.layouts import iter_rule_instances
from megatron_dgpo.weight_sync.transforms import (  # noqa: E402
    Region, copy_pieces, gate_up_merge, gate_up_split, hf_pieces, megatron_shard_from_hf, qkv_deinterleave,
    qkv_interleave, vocab_pad, vocab_strip,
)


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_folder(request, tmp_path_factory):
    cfg = tiny_config(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model = save_hf_model(cfg, folder)
    return cfg, folder, hf_state(model)


# ----------------------------------------------------------------------------- pure rules
def test_qkv_interleave_layout_and_round_trip():
    ng, qpg, hd, H = 2, 3, 4, 5
    q = torch.randn(ng * qpg * hd, H)
    k = torch.randn(ng * hd, H)
    v = torch.randn(ng * hd, H)
    fused = qkv_interleave(q, k, v, ng)
    # group 1 rows: [q heads 3..5, k_1, v_1]
    g1 = fused[(qpg + 2) * hd:]
    assert torch.equal(g1[: qpg * hd], q[qpg * hd:])
    assert torch.equal(g1[qpg * hd:(qpg + 1) * hd], k[hd:])
    assert torch.equal(g1[(qpg + 1) * hd:], v[hd:])
    for a, b in zip(qkv_deinterleave(fused, ng * qpg, ng, hd), (q, k, v)):
        assert torch.equal(a, b)
    qb, kb, vb = torch.randn(ng * qpg * hd), torch.randn(ng * hd), torch.randn(ng * hd)
    for a, b in zip(qkv_deinterleave(qkv_interleave(qb, kb, vb, ng), ng * qpg, ng, hd), (qb, kb, vb)):
        assert torch.equal(a, b)


def test_gate_up_is_stacked_per_shard():
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    fc1 = gate_up_merge(gate, up, tp=2)
    assert torch.equal(fc1[:4], gate[:4]) and torch.equal(fc1[4:8], up[:4]) and torch.equal(fc1[8:12], gate[4:])
    g, u = gate_up_split(fc1, tp=2)
    assert torch.equal(g, gate) and torch.equal(u, up)
    assert not torch.equal(gate_up_split(fc1, tp=1)[0], gate)  # the naive split is wrong at TP=2


def test_vocab_pad_strip():
    t = torch.randn(5, 2)
    p = vocab_pad(t, 8)
    assert p.shape == (8, 2) and torch.equal(p[5:], torch.zeros(3, 2)) and torch.equal(vocab_strip(p, 5), t)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_megatron_shards_reassemble_to_hf(hf_folder, tp):
    """HF -> TP shards (sliced reads) -> pieces -> HF, for every rule, bit-exact (TP 4, 8: fewer KV heads than TP)."""
    cfg, folder, sd = hf_folder
    with HFCheckpoint(folder) as ck:
        for layer, rule in iter_rule_instances(cfg):
            shards = [megatron_shard_from_hf(rule, layer, cfg, tp, r, ck.read) for r in range(tp)]
            if rule.rule == "vocab":
                assert shards[0].shape[0] * tp == cfg.padded_vocab_size(tp)
            pieces = hf_pieces(rule, cfg, shards)
            for name, ps in zip(rule.hf_names(layer), pieces):
                ref = sd[name]
                out = torch.full_like(ref, float("nan"))
                copy_pieces(out, Region(tuple(ref.shape)), ps)
                assert torch.equal(out, ref), name


@pytest.mark.parametrize("ng,tp", [(2, 2), (2, 4), (1, 4), (2, 8)])
def test_qkv_shards_are_megatron_equal_splits(ng, tp):
    """Megatron-Core's ColumnParallelLinear splits the TP=1 interleaved linear_qkv into t equal row blocks,
    also when t > num_query_groups (its forward all-gathers them and picks each rank's group)."""
    cfg = ModelConfig(arch="qwen2", hidden_size=32, num_attention_heads=8, num_query_groups=ng, qkv_bias=True)
    rule = next(r for r in get_layout(cfg) if r.megatron.endswith("linear_qkv.weight"))
    hd, H = cfg.head_dim, cfg.hidden_size
    full = {n: torch.randn(rows * hd, H) for n, rows in zip(rule.hf_names(0), (8, ng, ng))}

    def read(name, dim, start, stop):
        return full[name] if dim is None else full[name].narrow(dim, start, stop - start)
    want = qkv_interleave(*full.values(), ng).chunk(tp)
    got = [megatron_shard_from_hf(rule, 0, cfg, tp, r, read) for r in range(tp)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_qkv_layout_refuses_indivisible_tp():
    cfg = ModelConfig(arch="qwen2", hidden_size=48, num_attention_heads=6, num_query_groups=2)
    rule = next(r for r in get_layout(cfg) if r.megatron.endswith("linear_qkv.weight"))
    with pytest.raises(ValueError, match="one must divide the other"):
        megatron_shard_from_hf(rule, 0, cfg, 3, 0, lambda *a: None)


# ----------------------------------------------------------------------------- stream (no dist)
def test_stream_round_trip_and_logits(hf_folder):
    cfg, folder, sd = hf_folder
    mstate = megatron_state_from_hf(folder)
    got = dict(iter_hf_weights(mstate, cfg, bucket_bytes=20_000))
    assert list(got) == hf_tensor_names(cfg)
    assert set(got) == set(sd)
    for k in sd:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], sd[k]), k
    # bf16 cast
    got16 = dict(iter_hf_weights(mstate, cfg, dtype=torch.bfloat16))
    assert all(torch.equal(got16[k], sd[k].bfloat16()) for k in sd)


@pytest.mark.parametrize("target_tp", [2, 4])
def test_stream_inference_shards_single_process(hf_folder, target_tp):
    cfg, folder, sd = hf_folder
    mstate = megatron_state_from_hf(folder)
    st = WeightStreamer(mstate, cfg, receivers=[0] * target_tp, target_tp=target_tp, bucket_bytes=30_000,
                        integrity="always")
    per_rank = {r: {} for r in range(target_tp)}
    for b in st.stream():
        per_rank[b.inference_rank].update({n: t.clone() for n, t in b.named_tensors()})
    for r in range(target_tp):
        ref = reference_inference_shards(cfg, sd, target_tp, r)
        assert set(per_rank[r]) == set(ref)
        for k in ref:
            assert torch.equal(per_rank[r][k], ref[k]), (r, k)


def test_buckets_respect_size_and_verify_detects_corruption(hf_folder):
    cfg, folder, _ = hf_folder
    mstate = megatron_state_from_hf(folder)
    st = WeightStreamer(mstate, cfg, bucket_bytes=40_000, integrity="always")
    biggest = max(t.numel() * 4 for t in mstate.values())
    buckets = list(st.stream())
    assert len(buckets) > 3
    for b in buckets:
        assert sum(t.numel() * 4 for t in b.tensors) <= max(40_000, biggest)
    b = buckets[1]
    b.verify()
    b.buffer[17] ^= 0x10  # one flipped bit in the payload
    with pytest.raises(WeightSyncIntegrityError, match="integrity"):
        b.verify()
    b.buffer[17] ^= 0x10
    b.verify()
    # swapping two 8 KiB rows keeps the plain sum but not the position-weighted one
    if b.payload_bytes >= 2 * 8192:
        row0 = b.buffer[:8192].clone()
        b.buffer[:8192] = b.buffer[8192:16384]
        b.buffer[8192:16384] = row0
        if not torch.equal(b.buffer[:8192], row0):
            with pytest.raises(WeightSyncIntegrityError):
                b.verify()


def test_stream_rejects_unknown_parameter(hf_folder):
    cfg, folder, _ = hf_folder
    mstate = megatron_state_from_hf(folder)
    mstate["decoder.layers.0.mlp.linear_fc1.bias"] = torch.ones(8)
    with pytest.raises(WeightSyncError, match="linear_fc1.bias"):
        WeightStreamer(mstate, cfg)
    del mstate["decoder.layers.0.mlp.linear_fc1.bias"]
    del mstate["decoder.layers.2.mlp.linear_fc2.weight"]
    with pytest.raises(WeightSyncError, match="decoder.layers.2.mlp.linear_fc2.weight"):
        WeightStreamer(mstate, cfg)


def test_te_spec_names_match():
    cfg = tiny_config("qwen2")
    matcher = __import__("megatron_dgpo.weight_sync.layouts", fromlist=["x"]).megatron_matcher(get_layout(cfg))
    r, i = matcher.match("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight")
    assert r.hf[0].endswith("input_layernorm.weight") and i == 3
    r, i = matcher.match("decoder.layers.1.mlp.linear_fc1.layer_norm_weight")
    assert r.hf[0].endswith("post_attention_layernorm.weight") and i == 1


# ----------------------------------------------------------------------------- HF folder I/O
def test_write_hf_folder_sharded_loads_in_transformers(hf_folder, tmp_path):
    cfg, folder, sd = hf_folder
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    mstate = megatron_state_from_hf(folder)
    out = write_hf_folder(tmp_path / "out", iter_hf_weights(mstate, cfg, bucket_bytes=50_000),
                          source_dir=folder, max_shard_bytes=60_000)
    assert (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
    assert json.loads((out / "config.json").read_text())["model_type"] == cfg.arch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    for k, v in hf_state(m).items():
        assert torch.equal(v, sd[k]), k
    # write without a source folder: config from ModelConfig
    out2 = write_hf_folder(tmp_path / "out2", iter_hf_weights(mstate, cfg), model_cfg=cfg)
    assert HFCheckpoint(out2).model_config() == cfg
    with pytest.raises(FileExistsError):
        write_hf_folder(out2, iter_hf_weights(mstate, cfg), model_cfg=cfg)
    write_hf_folder(out2, iter_hf_weights(mstate, cfg), model_cfg=cfg, overwrite=True)


def test_write_hf_folder_is_atomic(tmp_path):
    cfg = tiny_config("llama")

    def failing():
        yield "a", torch.zeros(3)
        raise RuntimeError("stream broke")

    with pytest.raises(RuntimeError, match="stream broke"):
        write_hf_folder(tmp_path / "out", failing(), model_cfg=cfg, max_shard_bytes=1)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs(hf_folder, tmp_path):
    cfg, folder, sd = hf_folder
    with pytest.raises(CheckpointError, match="not a directory"):
        HFCheckpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        HFCheckpoint(tmp_path / "empty")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="only safetensors"):
        HFCheckpoint(pickled)
    # unsupported architecture
    from safetensors.torch import save_file
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    save_file({"wte.weight": torch.zeros(2, 2)}, str(gpt2 / "model.safetensors"))
    with pytest.raises(CheckpointError, match="gpt2"):
        HFCheckpoint(gpt2).model_config()
    # config features the Megatron model would silently ignore
    # (llama3 rope scaling is supported, but only with all four of its parameters)
    for i, (extra, match) in enumerate((
            ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
            ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_parameters"),
            ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"rope_scaling needs .* missing \['low_freq"),
            ({"hidden_act": "gelu"}, "hidden_act"), ({"mlp_bias": True}, "mlp_bias"))):
        d = tmp_path / f"cfg_{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), **extra}))
        (d / "model.safetensors").symlink_to(folder / "model.safetensors")
        with pytest.raises(CheckpointError, match=match):
            HFCheckpoint(d).model_config()
    # missing tensor / wrong shape: rewrite the checkpoint without / with a bad tensor
    victim = "model.layers.1.mlp.up_proj.weight"
    for kind in ("missing", "shape"):
        d = tmp_path / kind
        d.mkdir()
        (d / "config.json").write_text((folder / "config.json").read_text())
        bad = {k: v.contiguous() for k, v in sd.items()}
        if kind == "missing":
            del bad[victim]
        else:
            bad[victim] = torch.zeros(3, 3)
        save_file(bad, str(d / "model.safetensors"))
        with HFCheckpoint(d) as ck, pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
            check_hf_tensors(ck, cfg)
    # index naming a file that does not exist
    idx = tmp_path / "badindex"
    idx.mkdir()
    (idx / "config.json").write_text((folder / "config.json").read_text())
    (idx / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        HFCheckpoint(idx)
    with pytest.raises(ValueError, match="not supported"):
        get_layout(ModelConfig(arch="llama", qkv_bias=True))


# ----------------------------------------------------------------------------- memory bound
_MEM_SCRIPT = r"""
import sys, torch
from megatron_dgpo.model.config import ModelConfig
from megatron_dgpo.weight_sync import WeightStreamer
cfg = ModelConfig(arch="qwen2", vocab_size=4000, hidden_size=512, num_layers=16, num_attention_heads=8,
                  num_query_groups=2, ffn_hidden_size=2048)
from megatron_dgpo.weight_sync.layouts import iter_rule_instances, megatron_shape
state = {r.megatron.format(i=l): torch.full(megatron_shape(cfg, r, 1), 0.01) for l, r in iter_rule_instances(cfg)}
model_bytes = sum(t.numel() * 4 for t in state.values())
def anon():
    # Anonymous resident memory: what the stream allocates, without shared-library pages that
    # get faulted in as code runs (those made total-RSS peaks depend on what ran before).
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
out = [model_bytes]
for mb in map(int, sys.argv[1:]):
    st = WeightStreamer(state, cfg, bucket_bytes=mb << 20, integrity="always")
    before = anon()
    n, peak = 0, before
    for b in st.stream():  # sampled while each bucket is alive
        n += b.payload_bytes
        peak = max(peak, anon())
    assert n >= model_bytes * 0.99
    st.release_buffers()
    del st
    out.append(max(0, peak - before))
print(*out)
"""


def test_stream_memory_grows_with_bucket_not_model():
    """Peak anonymous memory growth while streaming a ~250 MB model tracks the bucket size, not the
    model size."""
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, "4", "48"], capture_output=True, text=True,
                         timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                           "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr[-3000:]
    model_bytes, small, large = map(int, out.stdout.split())
    res = dict(model_mib=model_bytes >> 20, grow_4mib_buckets_mib=small >> 20, grow_48mib_buckets_mib=large >> 20)
    assert small < 0.15 * model_bytes, res  # far below the model size (8 MB embedding travels alone)
    assert large > small + 20 * (1 << 20), res  # a bigger bucket costs more memory
    assert large < 0.6 * model_bytes, res


def test_buffers_recycled_only_when_unreferenced(hf_folder):
    """Without reuse_buffers, a bucket the consumer keeps is never overwritten by later buckets."""
    cfg, folder, sd = hf_folder
    mstate = megatron_state_from_hf(folder)
    st = WeightStreamer(mstate, cfg, bucket_bytes=20_000)
    kept = list(st.stream())  # keep every bucket (and thus every buffer) alive
    assert len({b.buffer.data_ptr() for b in kept}) == len(kept)
    got = {n: t for b in kept for n, t in b.named_tensors()}
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    ptrs = [b.buffer.untyped_storage().data_ptr() for b in st.stream()]  # consumer drops each bucket
    assert len(set(ptrs)) <= 3 < len(ptrs)  # recycled
