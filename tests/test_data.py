import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_dgpo.configio import ConfigError, load_config
from megatron_dgpo.data import (ArithmeticConfig, MalformedRowError, PromptDataConfig, PromptSampler,
                                arithmetic_datasets, build_char_tokenizer, load_prompt_dataset,
                                load_tokenizer, make_splits)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_arithmetic_splits_deterministic_disjoint_correct():
    cfg = ArithmeticConfig(min_digits=1, max_digits=3, operators=["+", "-", "*"], num_train=300,
                           num_eval=50, seed=3)
    tr, ev = make_splits(cfg)
    assert (tr, ev) == make_splits(cfg)
    assert len(tr) == 300 and len(ev) == 50
    assert not {r["prompt"] for r in tr} & {r["prompt"] for r in ev}
    assert len({r["prompt"] for r in tr}) == 300
    for r in tr + ev:
        expr = r["prompt"]
        assert expr.endswith("=")
        assert str(eval(expr[:-1])) == r["answer"]  # noqa: S307 - our own digits and operators
    assert make_splits(ArithmeticConfig(seed=4, num_train=300, num_eval=50))[1] != ev
    # held-out set does not depend on num_train
    assert make_splits(ArithmeticConfig(operators=["+", "-", "*"], num_train=10, num_eval=50, seed=3))[1] == ev


def test_arithmetic_config_validation():
    with pytest.raises(ValueError):
        ArithmeticConfig(operators=["/"])
    with pytest.raises(ValueError, match="unique problems"):
        make_splits(ArithmeticConfig(min_digits=1, max_digits=1, operators=["+"], num_train=90, num_eval=0))
    with pytest.raises(ConfigError):
        load_config(ArithmeticConfig, None, ["min_digits=4", "max_digits=2"])
    assert make_splits(ArithmeticConfig(min_digits=2, max_digits=2, num_train=5, num_eval=0))[0][0]["prompt"][1] in "0123456789"


def test_tokenizer_roundtrip_and_save_load(tmp_path, tok):
    text = "12+345= Hello, world!\n(x)"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.pad_token_id == 0 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    build_char_tokenizer(save_dir=tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    t2 = load_tokenizer(tmp_path)
    assert t2(text, add_special_tokens=False)["input_ids"] == ids
    msgs = [{"role": "user", "content": "1+2="}]
    s = t2.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert s == "<bos><|user|>1+2=<|assistant|>"
    enc = t2(s, add_special_tokens=False)["input_ids"]
    assert enc[0] == 1 and len(enc) == 2 + 4 + 1
    assert t2.decode([7, 2], skip_special_tokens=True) == "1"
    assert len(t2) <= 128  # fits the default ModelConfig vocabulary


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_verl_parquet_nested_ground_truth(tmp_path, tok):
    rows = [
        {"prompt": [{"role": "user", "content": "What is 1+1?"}], "reward_model": {"ground_truth": "2", "style": "rule"}},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
         "reward_model": {"ground_truth": "4", "style": "rule"}},
        {"prompt": [{"role": "user", "content": "x" * 500}], "reward_model": {"ground_truth": "5", "style": "rule"}},
    ]
    p = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    cfg = PromptDataConfig(path=str(p), max_prompt_length=100, prompt_suffix=" Answer in \\boxed{}.")
    ds = load_prompt_dataset(cfg, tok)
    assert ds.stats == {"rows": 3, "kept": 2, "too_long": 1, "malformed": 0}
    assert [e.ground_truth for e in ds.examples] == ["2", "4"]
    assert ds[0].prompt_text == "<bos><|user|>What is 1+1? Answer in \\boxed{}.<|assistant|>"
    assert tok.decode(ds[0].prompt_ids) == ds[0].prompt_text
    assert ds[1].prompt_text.startswith("<bos>Be brief.<|user|>2+2?")
    assert ds[1].uid == f"{p}:1"


def test_gsm8k_jsonl_regex_and_malformed(tmp_path, tok):
    p = tmp_path / "gsm8k.jsonl"
    _write_jsonl(p, [
        {"question": "Tom has 3 apples...", "answer": "He has 3+4=7.\n#### 7"},
        {"question": "no answer field"},
        "{not json",
        {"question": ["bad"], "answer": "#### 1"},
        {"question": "Q5", "answer": "#### 1,000"},
    ])
    base = dict(path=str(p), prompt_key="question", answer_key="answer", answer_regex=r"####\s*(.+)$")
    with pytest.raises(MalformedRowError, match=r"gsm8k.jsonl: row 1: missing answer field 'answer'"):
        load_prompt_dataset(PromptDataConfig(**base), tok)
    ds = load_prompt_dataset(PromptDataConfig(**base, on_malformed="skip"), tok)
    assert ds.stats == {"rows": 5, "kept": 2, "too_long": 0, "malformed": 3}
    assert [e.ground_truth for e in ds.examples] == ["7", "1,000"]
    assert ds[1].uid.endswith(":4")
    ds = load_prompt_dataset(PromptDataConfig(**base, on_malformed="skip", apply_chat_template=False,
                                              limit=1), tok)
    assert ds[0].prompt_text == "Tom has 3 apples..." and len(ds) == 1


def test_invalid_json_line_is_named(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    _write_jsonl(p, [{"prompt": "a", "answer": "1"}, "{oops"])
    with pytest.raises(MalformedRowError, match="line 2: invalid JSON"):
        load_prompt_dataset(PromptDataConfig(path=str(p), answer_key="answer"), tok)


def test_arithmetic_datasets(tok):
    tr, ev = arithmetic_datasets(ArithmeticConfig(num_train=40, num_eval=10), tok)
    assert len(tr) == 40 and len(ev) == 10
    e = tr[0]
    assert e.prompt_text.startswith("<bos><|user|>") and e.prompt_text.endswith("=<|assistant|>")
    assert tok.decode(e.prompt_ids) == e.prompt_text


def test_sampler_deterministic_resumable():
    data = list(range(10))
    s = PromptSampler(data, batch_size=3, seed=1)
    run = [s.next_batch() for _ in range(7)]
    # each epoch (3 batches) covers 9 distinct items
    for ep in range(2):
        flat = sum(run[3 * ep:3 * ep + 3], [])
        assert len(set(flat)) == 9
    assert run[0:3] != run[3:6]  # reshuffled per epoch
    s2 = PromptSampler(data, batch_size=3, seed=1)
    for _ in range(4):
        s2.next_batch()
    st = s2.state_dict()
    s3 = PromptSampler(data, batch_size=3, seed=1)
    s3.load_state_dict(st)
    assert [s3.next_batch() for _ in range(3)] == run[4:7]
    assert PromptSampler(data, 3, seed=2).next_batch() != run[0] or PromptSampler(data, 3, seed=3).next_batch() != run[0]
    assert PromptSampler(data, 3, shuffle=False).next_batch() == [0, 1, 2]
    with pytest.raises(ValueError):
        PromptSampler(data, batch_size=11)
