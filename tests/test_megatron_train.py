"""Train step invariance across TP / PP / DP / micro-batch split, exact logits gradient,
checkpoint resume and resharding (CPU, gloo).

The TP1/PP1/DP1 reference runs in this process (world of one); the torchrun workers
(tests/workers/megatron_train.py) reload its initial weights in other layouts and compare.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "workers"))
import megatron_common as C  # noqa: E402

from tests.torchrun_util import run_torchrun  # noqa: E402


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from megatron_dgpo import distributed

    yield C.make_reference(str(tmp_path_factory.mktemp("megatron_ref")))
    distributed.destroy()


def test_reference_is_nontrivial(reference):
    m = reference["ref"]["metrics"]
    assert m[0]["ln_tokens"] > 0 and m[0]["hp_tokens"] > 0, m[0]
    assert m[0]["grad_norm"] > 0 and m[1]["loss"] != m[0]["loss"]
    # padding of the vocabulary is masked: probabilities sum to one over the real vocab
    assert torch.isfinite(reference["ref"]["logp0"]).all()


def test_one_vs_four_micro_batches(reference):
    r4, r1 = reference["runs"][4], reference["runs"][1]
    for a, b in zip(r4["metrics"], r1["metrics"]):
        for key in ("loss", "grad_norm", "entropy", "ln_tokens", "hp_tokens"):
            assert C.close(b[key], a[key]), (key, b[key], a[key])
    ok, detail = C.compare_weights(r1["final"], r4["final"])
    assert ok, detail
    moved = C.rel_err(r4["final"]["decoder.layers.0.mlp.linear_fc1.weight"],
                      reference["ref"]["init"]["decoder.layers.0.mlp.linear_fc1.weight"])
    assert moved > 1e-4  # the steps changed the weights


def test_forward_logprobs_matches_plain_log_softmax(reference):
    """forward_logprobs == log_softmax of the model's logits (unpadded vocab), token-aligned."""
    from megatron_dgpo.model.builder import unwrap_model
    from megatron_dgpo.train import forward_logprobs

    chunks, batch = reference["chunks"], reference["batch"]
    (model,) = unwrap_model(chunks)
    with torch.no_grad():
        pos = torch.arange(batch.seq_length).unsqueeze(0).expand(batch.batch_size, -1)
        logits = model(input_ids=batch.tokens, position_ids=pos, attention_mask=None)
        logits = logits[..., : C.MODEL.vocab_size].double() / C.TEMPERATURE
        ref = torch.log_softmax(logits, -1)[:, :-1].gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
    lp, ent = forward_logprobs(chunks, batch, micro_batch_size=4, temperature=C.TEMPERATURE, with_entropy=True)
    assert lp.shape == batch.tokens.shape and (lp[:, 0] == 0).all()
    torch.testing.assert_close(lp[:, 1:].double(), ref, rtol=1e-5, atol=1e-5)
    p = torch.softmax(logits, -1)
    ref_ent = -(p * torch.log(p)).sum(-1)[:, :-1]
    torch.testing.assert_close(ent[:, 1:].double(), ref_ent, rtol=1e-5, atol=1e-5)


def _launch(reference, mode, nproc):
    return run_torchrun("megatron_train.py", nproc, "--ref", reference["dir"], "--mode", mode)


_TWO = [f"{c}/{k}" for c in ("tp2", "pp2", "pp2_uneven_1_3", "dp2") for k in
        ["runs", "forward_logprobs", "final_weights"] +
        [f"step{s}/{m}" for s in range(C.STEPS) for m in ("loss", "grad_norm", "entropy", "ln_tokens",
                                                           "hp_tokens", "w_ln_mean", "rollout_logp_abs_diff",
                                                           "diagnostics")]]
_TWO += ["tp2/logits_grad_vs_float64", "tp2/loss_vs_float64", "dp2/logits_grad_vs_float64",
         "dp2/loss_vs_float64", "pp2/resume_metrics", "pp2/resume_weights"]
_TWO += [f"tied_pp2/step{s}/{k}" for s in range(C.STEPS) for k in ("loss", "grad_norm")]
# token-budget, packed (THD, SDPA) and shared-prefix micro-batches against the padded reference
_TWO += [f"{c}/{k}" for c in ("budget_tp2_sp", "budget_pp2", "budget_dp2", "packed_tp2_sp", "packed_pp2",
                              "packed_dp2", "prefix_tp2_sp", "prefix_pp2", "prefix_dp2") for k in
         ["runs", "forward_logprobs", "final_weights", "grads_vs_padded", "weights_vs_padded"] +
         [f"step{s}/{m}" for s in range(C.STEPS) for m in ("loss", "grad_norm", "entropy", "w_ln_mean",
                                                           "rollout_logp_abs_diff")]]
_TWO += [f"{c}/shares_prompts" for c in ("prefix_tp2_sp", "prefix_pp2", "prefix_dp2")]
_FOUR = [f"{c}/{k}" for c in ("tp2pp2", "tp2dp2_sp_distopt", "pp2dp2_vpp2") for k in
         ["runs", "forward_logprobs", "final_weights"] +
         [f"step{s}/{m}" for s in range(C.STEPS) for m in ("loss", "grad_norm", "entropy")]]
_FOUR += ["tp2pp2/logits_grad_vs_float64", "tp2pp2/loss_vs_float64", "tp2pp2/resume_metrics",
          "tp2pp2/resume_weights", "tp2dp2_sp_distopt/resume_metrics", "tp2dp2_sp_distopt/resume_weights",
          "pp2dp2_vpp2/logits_grad_vs_float64"]
_FOUR += [f"{c}/{k}" for c in ("budget_tp2pp2_sp", "budget_pp2dp2", "packed_tp2dp2_sp_distopt",
                               "prefix_tp2pp2_sp") for k in
          ["runs", "forward_logprobs", "final_weights", "grads_vs_padded", "weights_vs_padded"] +
          [f"step{s}/{m}" for s in range(C.STEPS) for m in ("loss", "grad_norm", "entropy")]]
_FOUR += ["prefix_tp2pp2_sp/shares_prompts"]
_FOUR += [f"{c}/{k}" for c in ("distopt_tp2dp2_to_pp2dp2", "distopt_tp2dp2_to_tp1dp4")
          for k in ("step1/loss", "step1/grad_norm", "final_weights")]


@pytest.fixture(scope="module")
def two_proc(reference):
    return _launch(reference, "two", 2)


@pytest.fixture(scope="module")
def four_proc(reference):
    return _launch(reference, "four", 4)


@pytest.mark.dist
@pytest.mark.parametrize("name", _TWO)
def test_two_process_layouts(two_proc, name):
    assert name in two_proc, f"check {name} missing; got {sorted(two_proc)[:8]}..."
    assert two_proc[name]["ok"], two_proc[name]["detail"]


@pytest.mark.dist
@pytest.mark.parametrize("name", _FOUR)
def test_four_process_layouts(four_proc, name):
    assert name in four_proc, f"check {name} missing; got {sorted(four_proc)[:8]}..."
    assert four_proc[name]["ok"], four_proc[name]["detail"]


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_sequence_aggregations_split_and_padding_invariant(reference, aggregation):
    """1 vs 4 micro-batches and extra right padding give the same loss and grad norm."""
    import dataclasses

    from megatron_dgpo.checkpoint import load_checkpoint
    from megatron_dgpo.train import train_step

    cfg = dataclasses.replace(C.loss_config(), aggregation=aggregation)
    batch = reference["batch"]
    results = []
    for mbs, pad in ((8, 1), (2, 1), (2, 8)):
        chunks, opt = C.setup(1, 1)
        load_checkpoint(os.path.join(reference["dir"], "init"), chunks, opt, load_optimizer=False)
        b = batch.pad_to(batch.seq_length + pad) if pad > 1 else batch
        if pad > 1:  # pad_to rounds up to a multiple: keep the original length as Dr.GRPO's constant
            cfg_b = dataclasses.replace(cfg, norm_length=batch.seq_length) if aggregation.endswith("norm") else cfg
        else:
            cfg_b = cfg
        results.append(train_step(chunks, opt, b, cfg_b, micro_batch_size=mbs, temperature=C.TEMPERATURE))
    for r in results[1:]:
        for key in ("loss", "grad_norm", "entropy"):
            assert C.close(r[key], results[0][key]), (key, r[key], results[0][key])
