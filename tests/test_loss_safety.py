"""NaN safety, dtypes and bad input."""
import pytest
import torch

from megatron_dgpo.loss import PolicyLossConfig, policy_loss, registered_losses

NAMES = registered_losses()


def _run(name, logp, old, adv, mask=None, **cfg_kw):
    mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask
    logp = logp.clone().requires_grad_()
    loss, metrics = policy_loss(PolicyLossConfig(name=name, **cfg_kw), logp, old, adv, mask)
    loss.backward()
    return loss, metrics, logp.grad


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_inputs_are_finite(name, dtype):
    # |logp - old| = 60 both ways, logp = -1e4, old = -1e4, ratios far outside every clip range.
    logp = torch.tensor([[-1.0, -61.0, -1e4, -0.5, -1e4, -3.0, -200.0, -0.1]], dtype=dtype)
    old = torch.tensor([[-61.0, -1.0, -0.5, -1e4, -1e4, -3.0, -0.1, -200.0]], dtype=dtype)
    for a in (-1.0, 1.0):
        adv = torch.full((1,), a, dtype=dtype)
        for extra in ({}, {"dgpo_n": 4.0, "dgpo_m": 0.5} if name == "dgpo" else {}):
            loss, metrics, grad = _run(name, logp, old, adv, **extra)
            assert torch.isfinite(loss), (name, a, extra)
            assert torch.isfinite(grad.float()).all(), (name, a, extra, grad)
            assert all(bool(torch.isfinite(v).all()) for v in metrics.values())
            assert loss.dtype == torch.float32


def test_reference_overflow_case_is_finite():
    # The reference evaluates r^(n+1) on every token: (n+1)(logp - old) > 88 overflows there.
    logp = torch.tensor([[-0.01]])
    old = torch.tensor([[-60.0]])
    _, _, grad = _run("dgpo", logp, old, torch.tensor([1.0]), dgpo_n=2.0)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_bf16_matches_fp32(name):
    g = torch.Generator().manual_seed(0)
    lp32 = (-torch.rand(4, 16, generator=g) * 3).to(torch.bfloat16).float()
    old = lp32 + torch.randn(4, 16, generator=g) * 0.3
    adv = torch.randn(4, generator=g)
    l32, _, g32 = _run(name, lp32, old, adv)
    l16, _, g16 = _run(name, lp32.to(torch.bfloat16), old, adv)
    torch.testing.assert_close(l16, l32, rtol=1e-5, atol=1e-6)
    assert g16.dtype == torch.bfloat16
    torch.testing.assert_close(g16.float(), g32, rtol=1e-2, atol=1e-3)


def test_padding_garbage_does_not_leak():
    logp = torch.tensor([[-1.0, float("-inf"), float("nan")]])
    old = torch.tensor([[-1.1, float("nan"), 5.0]])
    adv = torch.tensor([[0.5, float("nan"), float("inf")]])
    mask = torch.tensor([[True, False, False]])
    for name in NAMES:
        loss, _, grad = _run(name, logp, old, adv, mask)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert grad[0, 1] == 0 and grad[0, 2] == 0


def test_empty_mask_gives_zero():
    logp = torch.randn(2, 3)
    for name in NAMES:
        loss, metrics, grad = _run(name, logp, logp + 0.1, torch.ones(2), torch.zeros(2, 3, dtype=torch.bool))
        assert float(loss.detach()) == 0 and torch.all(grad == 0)
        assert float(metrics["ln_frac"]) == 0


@pytest.mark.parametrize("bad,match", [
    (dict(old_logp=torch.zeros(2, 4)), "old_logp has shape"),
    (dict(mask=torch.ones(3, 3, dtype=torch.bool)), "mask has shape"),
    (dict(advantages=torch.zeros(5)), "advantages has shape"),
    (dict(logp=torch.zeros(6)), "logp must be a"),
    (dict(advantages=torch.tensor([1.0, float("nan")])), "advantages is not finite"),
    (dict(old_logp=torch.tensor([[0.0, 0, 0], [0, float("inf"), 0]])), "old_logp is not finite at 1 valid"),
    (dict(normalizer=-1), "normalizer must be >= 0"),
])
def test_bad_input_errors(bad, match):
    args = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), advantages=torch.ones(2),
                mask=torch.ones(2, 3, dtype=torch.bool), normalizer=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        policy_loss(PolicyLossConfig(), **args)


@pytest.mark.parametrize("kw,match", [
    (dict(name="ppo2"), "not a registered loss"),
    (dict(eps_low=1.0), "eps_low"),
    (dict(eps_low=-0.1), "eps_low"),
    (dict(eps_high=0.0), "eps_high"),
    (dict(dgpo_n=-1), "dgpo_n"),
    (dict(dgpo_m=0), "dgpo_m"),
    (dict(aggregation="mean"), "aggregation"),
    (dict(name="grpo", dual_clip_c=1.1), "must exceed"),
    (dict(name="cispo", dual_clip_c=3.0), "not used by cispo"),
    (dict(name="aspo", dual_clip_c=None), "ASPO's c"),
    (dict(dual_clip_c="three"), "dual_clip_c"),
    (dict(norm_length=0), "norm_length"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kw)


def test_config_defaults():
    assert PolicyLossConfig().dual_clip_c is None  # DGPO: off, as in the reference code
    assert PolicyLossConfig(name="grpo").dual_clip_c == 3.0
    assert PolicyLossConfig(name="grpo", dual_clip_c=None).dual_clip_c is None
    assert PolicyLossConfig(name="dgpo", dual_clip_c=3).dual_clip_c == 3.0
    assert PolicyLossConfig(name="cispo", eps_low=5.0).lower < 0  # one-sided CISPO
    dapo = PolicyLossConfig.paper_defaults("dapo")
    assert dapo.name == "grpo" and dapo.eps_high == 0.28
    assert PolicyLossConfig.paper_defaults("gspo").aggregation == "seq-mean-token-mean"
    assert PolicyLossConfig.paper_defaults("gppo").dual_clip_c == 10.0


def test_register_loss_extends_registry():
    from megatron_dgpo.loss import TokenTerms, register_loss
    from megatron_dgpo.loss.registry import _REGISTRY

    @register_loss("vanilla_is_test")
    def vanilla(cfg, ctx):
        return TokenTerms(loss=-ctx.adv * ctx.ratio, w_logp=ctx.ratio.detach(), dual=torch.zeros_like(ctx.mask))

    try:
        loss, _, grad = _run("vanilla_is_test", torch.tensor([[-1.0]]), torch.tensor([[-1.0]]), torch.tensor([2.0]))
        assert float(grad) == pytest.approx(-2.0)
        with pytest.raises(ValueError, match="already registered"):
            register_loss("vanilla_is_test")(vanilla)
    finally:
        _REGISTRY.pop("vanilla_is_test")


def test_weight_metric_is_zero_where_the_clamp_blocks_the_gradient():
    # DGPO HP token with log r = 25 > 20: no gradient, so its W_logp (and w_hp_mean) is 0.
    loss, metrics, grad = _run("dgpo", torch.tensor([[0.0]]), torch.tensor([[-25.0]]), torch.tensor([1.0]))
    assert float(grad) == 0.0
    assert float(metrics["hp_tokens"]) == 1 and float(metrics["w_hp_mean"]) == 0.0
