"""Embedded rollout engine: a `transformers` causal LM (Qwen2 / Llama) with its own sampling loop.

For CPU tests and small single-GPU runs. Prompts are left-padded into one batch and decoded with
the model's KV cache; the samples of one prompt share its prefill; finished rows keep decoding
padding until the whole batch is done.
"""
from __future__ import annotations

import inspect
import logging
from typing import Optional

import torch

from .base import NamedTensors, RolloutEngine, RolloutSample, SamplingParams

log = logging.getLogger(__name__)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and the top-p nucleus to -inf (at least one token kept)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    return logits


def _float32_last(logits: torch.Tensor) -> torch.Tensor:
    """The last position's logits `[B, V]` as a float32 buffer the sampler may overwrite: the
    model's own output when it is float32 and only the last position was computed, else a copy."""
    last = logits[:, -1, :]
    if logits.dtype == torch.float32 and logits.shape[1] == 1:
        return last
    return last.to(torch.float32, copy=True)


# Rows sampled together: their filtered probabilities and the sampler's Exp(1) noise are
# temporaries of rows x V elements, so chunks of at most this many elements keep the step's peak at
# ~1 [B, V] buffer for large vocabularies (one row at a time from 65,536 entries up) while a small
# vocabulary samples the whole batch in one call (per-row calls were 28 % of the embedded demo's
# rollout: docs/benchmarks.md).
SAMPLE_CHUNK_ELEMENTS = 1 << 16


@torch.no_grad()
def sample_next_(buf: torch.Tensor, sp: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    """Next tokens `[B]` from float32 logits `buf` `[B, V]`, which is overwritten in place with the
    (unfiltered) log-probs at the log-prob temperature; the only `[B, V]` tensor of the step.

    The same tokens for the same generator as torch.multinomial over the whole batch of
    softmax(filter_logits(logits / T)): rows are drawn in chunks of SAMPLE_CHUNK_ELEMENTS
    (their filtered probabilities and the sampler's Exp(1) noise are chunk temporaries), and on
    CPU the generator's draws are consumed in element order, so chunk by chunk equals the batch.
    (On CUDA each call draws fresh Philox numbers: the same distribution, different samples than
    one batched call.) Peak during generate(), 262,144-entry vocabulary, 64 rows: 1.03 x `[B, V]`
    float32, against 5.0 x (10 x with top-k/top-p) for one batched multinomial
    (tools/bench_memory.py, docs/benchmarks.md)."""
    buf.div_(sp.logprob_temperature)
    if sp.greedy:
        nxt = buf.argmax(dim=-1)
    else:
        nxt = torch.empty(buf.shape[0], dtype=torch.long, device=buf.device)
        rows = max(1, SAMPLE_CHUNK_ELEMENTS // buf.shape[1])
        for b in range(0, buf.shape[0], rows):
            probs = torch.softmax(filter_logits(buf[b:b + rows], sp.top_k, sp.top_p), dim=-1)
            nxt[b:b + rows] = torch.multinomial(probs, 1, generator=gen)[:, 0]
    torch.log_softmax(buf, dim=-1, out=buf)  # in place: the kernel reads each row before writing it
    return nxt


class HFRolloutEngine(RolloutEngine):
    def __init__(self, model, eos_token_ids: list[int] | int | None = None, pad_token_id: int = 0,
                 device: str | torch.device = "cpu", max_batch_size: int = 64, seed: int = 0):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        eos = eos_token_ids if eos_token_ids is not None else getattr(model.config, "eos_token_id", None)
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self._gen = torch.Generator(device=self.device).manual_seed(seed)
        self._version = "0"
        self._released = False
        # transformers 5.x renamed the KV-cache argument and output field to `cache`
        params = inspect.signature(type(self.model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.share_prefill = True  # one prefill per distinct prompt (False: one per row)

    @classmethod
    def from_hf_config(cls, hf_config: dict, dtype: torch.dtype = torch.float32, init_seed: int = 0, **kw):
        """A randomly initialised model from a config.json dict (e.g. ModelConfig.to_hf_config())."""
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(hf_config)
        model_type = cfg.pop("model_type")
        cfg.pop("torch_dtype", None)
        config = AutoConfig.for_model(model_type, **cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return cls(model, **kw)

    @property
    def weight_version(self) -> str:
        return self._version

    # ---- weights -----------------------------------------------------------------------------
    def expected_weight_names(self) -> set[str]:
        # named_parameters() lists a tied lm_head once, under the embedding's name
        return {n for n, _ in self.model.named_parameters()}

    @torch.no_grad()
    def update_weights(self, named_tensors: NamedTensors, version: int | str, partial: bool = False) -> None:
        """Copy HF-named tensors into the model. Every name must exist with the same shape and,
        unless `partial`, every parameter must be given; nothing is written if a check fails."""
        state = dict(self.model.named_parameters())
        aliases = dict(self.model.state_dict(keep_vars=True))  # includes tied aliases
        incoming = list(named_tensors)
        names = [n for n, _ in incoming]
        unknown = [n for n in names if n not in aliases]
        if unknown:
            raise KeyError(f"update_weights: unknown parameter name(s) {unknown[:5]}"
                           f"{' ...' if len(unknown) > 5 else ''}")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"update_weights: duplicate name(s) {sorted(dup)[:5]}")
        for n, t in incoming:
            if tuple(t.shape) != tuple(aliases[n].shape):
                raise ValueError(f"update_weights: {n} has shape {tuple(t.shape)}, expected {tuple(aliases[n].shape)}")
        if not partial:
            given = {aliases[n].data_ptr() for n in names}
            missing = [n for n, p in state.items() if p.data_ptr() not in given]
            if missing:
                raise ValueError(f"update_weights: missing parameter(s) {missing[:5]}"
                                 f"{' ...' if len(missing) > 5 else ''}")
        for n, t in incoming:
            aliases[n].data.copy_(t.to(device=aliases[n].device, dtype=aliases[n].dtype))
        self._version = str(version)

    def release_memory(self, tags: Optional[list[str]] = None) -> None:
        if self.device.type == "cuda" and not self._released:
            self.model.to("cpu")
            torch.cuda.empty_cache()
            self._released = True

    def resume_memory(self, tags: Optional[list[str]] = None) -> None:
        if self._released:
            self.model.to(self.device)
            self._released = False

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutSample]:
        if self._released:
            raise RuntimeError("generate() after release_memory(); call resume_memory() first")
        if any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("empty prompt")
        gen = self._gen
        if sampling.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(sampling.seed)
        rows = [(i, p) for i, p in enumerate(prompt_token_ids) for _ in range(sampling.n)]
        out: list[RolloutSample] = []
        for s in range(0, len(rows), self.max_batch_size):
            out += self._generate_batch(rows[s:s + self.max_batch_size], sampling, gen)
        return out

    @torch.no_grad()
    def _generate_batch(self, rows, sp: SamplingParams, gen: torch.Generator) -> list[RolloutSample]:
        dev = self.device
        B = len(rows)
        # The rows of one prompt share its prefill (as SGLang's prefix cache does): the distinct
        # prompts run once, then every row takes its prompt's KV cache and last-position logits.
        first: dict[int, int] = {}
        inverse = [first.setdefault(pi, len(first)) for pi, _ in rows]
        expand = None
        prompts = [p for _, p in rows]
        if self.share_prefill and len(first) < B:
            prompts = list({pi: p for pi, p in rows}.values())  # in order of first appearance, as `first`
            expand = torch.tensor(inverse, dtype=torch.long, device=dev)
        L = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), L), self.pad_token_id, dtype=torch.long, device=dev)
        mask = torch.zeros((len(prompts), L), dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long, device=dev)
            mask[b, L - len(p):] = 1
        # left padding: positions count only real tokens, so each row sees the same RoPE
        # positions as it would alone
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        stop = torch.tensor(sorted(set(self.eos_token_ids) | set(sp.stop_token_ids)) or [-1], device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        tokens, lps = [], []
        past = None
        step_ids, step_pos = ids, pos
        for _ in range(sp.max_new_tokens):
            res = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                             use_cache=True, **self._keep_last, **{self._cache_kw: past})
            past = getattr(res, self._cache_kw)
            buf = _float32_last(res.logits)
            del res
            if expand is not None:  # after the shared prefill: one row per sample from here on
                past.batch_select_indices(expand)
                buf, mask, step_pos, expand = buf[expand], mask[expand], step_pos[expand], None
            try:
                nxt = sample_next_(buf, sp, gen)
            except RuntimeError as e:  # torch's check of the probabilities: say what it means
                if "probability tensor" not in str(e):
                    raise
                from megatron_dgpo.rl.guard import NonFiniteWeightsError

                raise NonFiniteWeightsError(
                    f"rollout engine: non-finite logits with the weights of version {self._version} (finite "
                    "but overflowing weights, e.g. from a too large optim.lr): resume from a checkpoint "
                    "written before that version with a lower optim.lr") from None
            nxt = torch.where(done, torch.full_like(nxt, self.pad_token_id), nxt)
            tokens.append(nxt)
            lps.append(buf.gather(-1, nxt[:, None]).squeeze(-1))  # sample_next_ left the log-probs in buf
            del buf  # before the next forward allocates the next step's logits
            done = done | torch.isin(nxt, stop)
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        tok = torch.stack(tokens, 1).tolist()
        lp = torch.stack(lps, 1).tolist()
        stop_set = set(stop.tolist())
        out = []
        for b, (pi, p) in enumerate(rows):
            resp, reason = [], "length"
            for t in tok[b]:
                resp.append(t)
                if t in stop_set:
                    reason = "stop"
                    break
            out.append(RolloutSample(pi, list(p), resp, lp[b][:len(resp)], reason, self._version))
        return out
