"""Data files (issue 11, item 8): explicit UTF-8 (BOM tolerated), non-UTF-8 lines named by file
and line and subject to on_malformed, gzipped JSONL and parquet, answer_regex without a capture
group refused at load, an empty or "nan" ground truth is malformed."""
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_dgpo.configio import ConfigError, load_config
from megatron_dgpo.config import TrainConfig
from megatron_dgpo.data import MalformedRowError, PromptDataConfig, build_char_tokenizer, load_prompt_dataset


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _lines(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def _cfg(p, **kw):
    return PromptDataConfig(path=str(p), prompt_key="q", answer_key="a", apply_chat_template=False, **kw)


def test_bom_and_non_utf8_lines(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + _lines([{"q": "1+1=", "a": "2"}]) + b'{"q": "\xff\xfe", "a": "3"}\n'
                  + _lines([{"q": "2+2=", "a": "4"}]))
    with pytest.raises(MalformedRowError, match=r"d\.jsonl: row 1: .*line 2: not UTF-8"):
        load_prompt_dataset(_cfg(p), tok)
    ds = load_prompt_dataset(_cfg(p, on_malformed="skip"), tok)
    assert [e.ground_truth for e in ds.examples] == ["2", "4"] and ds.stats["malformed"] == 1


def test_gzipped_jsonl_and_parquet(tmp_path, tok):
    rows = [{"q": "1+1=", "a": "2"}, {"q": "2+3=", "a": "5"}]
    p = tmp_path / "d.jsonl.gz"
    p.write_bytes(gzip.compress(b"\xef\xbb\xbf" + _lines(rows)))
    assert [e.ground_truth for e in load_prompt_dataset(_cfg(p), tok).examples] == ["2", "5"]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    q = tmp_path / "d.parquet.gz"
    q.write_bytes(gzip.compress(buf.getvalue()))
    assert [e.ground_truth for e in load_prompt_dataset(_cfg(q), tok).examples] == ["2", "5"]
    bad = tmp_path / "t.jsonl.gz"
    bad.write_bytes(gzip.compress(_lines(rows))[:-12])  # truncated
    with pytest.raises(MalformedRowError, match="t.jsonl.gz"):
        load_prompt_dataset(_cfg(bad), tok)
    z = tmp_path / "d.jsonl.zst"
    z.write_bytes(b"(\xb5/\xfd")
    with pytest.raises(ConfigError, match="gzip"):
        load_prompt_dataset(_cfg(z), tok)
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompt_dataset(_cfg(tmp_path / "nope.jsonl"), tok)


def test_answer_regex_needs_a_group():
    with pytest.raises(ValueError, match="no capture group"):
        PromptDataConfig(answer_regex=r"####\s*\d+")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        PromptDataConfig(answer_regex=r"(unclosed")
    with pytest.raises(ConfigError, match=r"data\.train.*answer_regex 'answer=.*no capture group"):
        load_config(TrainConfig, None, ["data.task=file", "data.train.path=x.jsonl", r"data.train.answer_regex=answer=\d+"])


@pytest.mark.parametrize("answer", ["nan", "NaN", " ", "", None, float("nan"), "#### "])
def test_empty_or_nan_ground_truth_is_malformed(tmp_path, tok, answer):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"q": "1+1=", "a": answer}) + "\n" + json.dumps({"q": "2+2=", "a": "#### 4"}) + "\n")
    cfg = dict(answer_regex=r"####\s*(.*)$") if answer == "#### " else {}
    with pytest.raises(MalformedRowError, match="row 0"):
        load_prompt_dataset(_cfg(p, **cfg), tok)
    ds = load_prompt_dataset(_cfg(p, on_malformed="skip", answer_regex=r"(?:####\s*)?(.*)$"), tok)
    assert [e.ground_truth for e in ds.examples] == ["4"] and ds.stats["malformed"] == 1
