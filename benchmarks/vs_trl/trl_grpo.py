"""TRL's GRPOTrainer doing the work of `make demo`'s job (run with the TRL virtualenv that
bench.py builds; the project root on PYTHONPATH for its tokenizer and reward, which need only
transformers):

- weights: the project's cached warm-start HF folder (float32); tokenizer: the project's char
  tokenizer (a transformers fast tokenizer); prompts: the project's, in its sampler's order
  (bench.py exports them); reward: the project's ExactMatchReward;
- one RL step = the same 32 prompts x 8 completions, at most 5 new tokens, temperature 1;
  4 optimizer steps of 64 completions (per_device_train_batch_size=64, steps_per_generation=4,
  num_iterations=1): later mini-batches are off policy, so TRL recomputes old log-probs;
  clip 0.2, beta 0 (no reference model), group-std advantages, loss_type "bnpo" (token mean over
  an optimizer step's mini-batch, the project's token-mean); Adam lr 5e-5 constant, clip 1.0.

Writes OUT/timings.json (per optimizer step begin/end, generation times and generated tokens) and
OUT/final (the trained model).
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True, help="folder written by bench.py (prompts, meta.json)")
    p.add_argument("--model", required=True, help="the project's warm-start HF folder")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None)
    a = p.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_dgpo.data import build_char_tokenizer
    from megatron_dgpo.reward import ExactMatchReward

    meta = json.load(open(os.path.join(a.data, "meta.json")))
    rows = [json.loads(line) for line in open(os.path.join(a.data, "train_steps.jsonl"))]
    steps = a.steps or meta["steps"]
    per_step, G, mini = meta["prompts_per_step"], meta["group_size"], meta["mini_batches"]
    rows = rows[:steps * per_step]
    tok = build_char_tokenizer()
    for r in rows[:per_step]:  # the templated text must encode to the project's prompt ids
        assert tok(r["prompt"])["input_ids"] == r["prompt_ids"], (r["prompt"], r["prompt_ids"])
    ds = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    exact = ExactMatchReward()

    def exact_match(prompts, completions, answer, **kw):
        return exact.score(list(completions), list(answer))[0]

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    batch = per_step * G
    args = GRPOConfig(
        output_dir=a.out, report_to="none", save_strategy="no", logging_steps=mini,
        use_cpu=True, bf16=False, fp16=False, seed=meta["seed"], data_seed=meta["seed"],
        gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True,
        per_device_train_batch_size=batch // mini, gradient_accumulation_steps=1,
        steps_per_generation=mini, num_iterations=1, num_generations=G,
        max_steps=steps * mini, shuffle_dataset=False,
        max_completion_length=meta["max_new_tokens"], temperature=meta["temperature"], top_p=1.0, top_k=0,
        learning_rate=meta["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=meta["clip_grad"],
        beta=0.0, epsilon=meta["eps_low"], epsilon_high=meta["eps_high"], loss_type="bnpo",
        scale_rewards="group", mask_truncated_completions=False,
    )
    rec = {"step_begin": {}, "step_end": {}, "gen": [], "gen_tokens": [], "threads": torch.get_num_threads()}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            rec["step_begin"][state.global_step] = time.time()

        def on_step_end(self, args, state, control, **kw):
            rec["step_end"][state.global_step] = time.time()
            with open(os.path.join(a.out, "progress"), "w") as f:  # optimizer steps done: bench.py's memory window
                f.write(str(state.global_step))

    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[Clock()])
    generate = trainer._generate  # private: the only place that sees the completions' lengths

    def timed_generate(prompts):
        t = time.time()
        out = generate(prompts)
        rec["gen"].append((t, time.time()))
        rec["gen_tokens"].append(sum(len(c) for c in out[1]))
        return out

    trainer._generate = timed_generate
    trainer.train()
    trainer.model.save_pretrained(os.path.join(a.out, "final"))
    with open(os.path.join(a.out, "timings.json"), "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main()
