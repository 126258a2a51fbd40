"""Prompt datasets for RLVR: rows of (prompt, ground-truth answer) from parquet or JSONL files
(verl / GSM8K / MATH conventions) or from the built-in arithmetic task, tokenized once up front.

A prompt is either a string or a chat `messages` list; with `apply_chat_template` the tokenizer's
template turns it into the model's input. Field names are dotted paths, so verl's
`reward_model.ground_truth` works as well as a flat `answer` column.

Files: `.parquet`, `.jsonl` / `.json` (one object per line), each optionally gzipped (`.gz`). JSONL
is UTF-8 (a leading BOM is tolerated); a line that is not valid UTF-8 or not valid JSON is a
malformed row (named by file and line, subject to `on_malformed`). A ground truth that is empty or
"nan" (a missing value exported by pandas) is malformed too.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from megatron_dgpo.configio import ConfigError

log = logging.getLogger(__name__)


class MalformedRowError(ValueError):
    pass


@dataclass
class PromptDataConfig:
    path: str = ""
    format: Literal["auto", "parquet", "jsonl"] = "auto"
    prompt_key: str = "prompt"  # dotted path; a string or a list of {"role","content"} messages
    answer_key: str = "reward_model.ground_truth"  # dotted path; GSM8K raw: "answer"
    # Regex with one group that extracts the answer from the answer field (GSM8K raw: "####\s*(.+)$").
    answer_regex: Optional[str] = None
    apply_chat_template: bool = True
    system_prompt: Optional[str] = None
    prompt_suffix: str = ""  # appended to the (last user) prompt text, e.g. a \boxed{} instruction
    max_prompt_length: int = 1024  # in tokens; longer prompts are dropped and counted
    on_malformed: Literal["error", "skip"] = "error"
    limit: Optional[int] = None  # keep at most this many rows (after filtering)

    def __post_init__(self):
        if self.max_prompt_length <= 0:
            raise ValueError("PromptDataConfig.max_prompt_length must be positive")
        if self.answer_regex is not None:
            shown = self.answer_regex[:80]
            try:
                groups = re.compile(self.answer_regex).groups
            except re.error as e:
                raise ValueError(f"answer_regex {shown!r} is not a valid regular expression: {e}") from None
            if groups < 1:
                raise ValueError(f"answer_regex {shown!r} has no capture group: wrap the answer in (...)")


@dataclass
class PromptExample:
    prompt_ids: list[int]
    ground_truth: str
    prompt_text: str  # what was tokenized (after the chat template), for logging
    uid: str  # "<file>:<row>" or "<task>:<split>:<index>", stable across runs


@dataclass
class PromptDataset:
    examples: list[PromptExample]
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PromptExample:
        return self.examples[i]


def _format_of(path: Path) -> str:
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".bz2", ".xz", ".zst", ".zip", ".7z", ".tar")):
        raise ConfigError(f"{path}: compressed with something other than gzip; supported: .parquet, .jsonl, "
                          ".json, each optionally .gz")
    return "jsonl"  # .jsonl / .json / anything else, as before


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def read_rows(path: str | Path, fmt: str = "auto") -> list[dict]:
    """All rows of a parquet or JSONL file (optionally .gz) as dicts. Undecodable or invalid JSON
    lines become MalformedRowError markers naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    if fmt == "auto":
        fmt = _format_of(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with _open_binary(path) as f:
                return pq.read_table(io.BytesIO(f.read()) if path.name.lower().endswith(".gz") else path).to_pylist()
        rows = []
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    rows.append(MalformedRowError(f"{path}: line {lineno}: not UTF-8 ({e.reason} at byte {e.start})"))
                    continue
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    # Kept as a marker so the malformed policy (error/skip) applies to it as well.
                    rows.append(MalformedRowError(f"{path}: line {lineno}: invalid JSON: {e}"))
        return rows
    except (OSError, EOFError, gzip.BadGzipFile) as e:  # truncated / corrupt gzip, unreadable file
        raise MalformedRowError(f"{path}: cannot read: {str(e)[:200]}") from None
    except Exception as e:  # pyarrow's errors (ArrowInvalid, ...) are not a common base class
        if type(e).__module__.startswith("pyarrow"):
            raise MalformedRowError(f"{path}: not a readable parquet file: {str(e)[:200]}") from None
        raise


def _get(row: Any, dotted: str) -> Any:
    cur = row
    for part in dotted.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            raise KeyError(dotted)
    return cur


def _messages(prompt: Any, cfg: PromptDataConfig) -> list[dict]:
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        msgs = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise MalformedRowError("prompt must be a string or a non-empty list of {role, content} messages")
    if cfg.prompt_suffix:
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
        if last_user is None:
            raise MalformedRowError("prompt has no user message to append prompt_suffix to")
        msgs[last_user] = dict(msgs[last_user], content=msgs[last_user]["content"] + cfg.prompt_suffix)
    if cfg.system_prompt is not None and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": cfg.system_prompt})
    return msgs


def render_prompt(prompt: Any, tokenizer, cfg: PromptDataConfig) -> tuple[str, list[int]]:
    msgs = _messages(prompt, cfg)
    if cfg.apply_chat_template:
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    else:
        text = "\n".join(m["content"] for m in msgs)
    # The template already wrote any bos text; encoding without specials avoids a second one.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text, list(ids)


def _answer(row: dict, cfg: PromptDataConfig) -> str:
    ans = _get(row, cfg.answer_key)
    if isinstance(ans, (int, float)) and not isinstance(ans, bool):
        ans = str(ans)
    if isinstance(ans, list) and ans and all(isinstance(a, str) for a in ans):
        ans = ans[0]  # some MATH exports store a list of acceptable answers; the checker needs one
    if not isinstance(ans, str) or not ans.strip():
        raise MalformedRowError(f"answer {cfg.answer_key!r} must be a non-empty string, got {str(ans)[:80]!r}")
    if cfg.answer_regex:
        m = re.search(cfg.answer_regex, ans, flags=re.MULTILINE | re.DOTALL)
        if not m:
            raise MalformedRowError(f"answer_regex {cfg.answer_regex[:80]!r} does not match {ans[:80]!r}")
        ans = m.group(1) or ""
    ans = ans.strip()
    if not ans or ans.lower() == "nan":  # "nan": a missing value written out by pandas
        raise MalformedRowError(f"answer {cfg.answer_key!r} is {ans!r}: not a ground truth")
    return ans


def build_dataset(rows: list, tokenizer, cfg: PromptDataConfig, source: str) -> PromptDataset:
    """Tokenize rows; count and drop over-long prompts; malformed rows raise or are skipped."""
    stats = {"rows": len(rows), "kept": 0, "too_long": 0, "malformed": 0}
    examples = []
    for i, row in enumerate(rows):
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise MalformedRowError(f"row is a {type(row).__name__}, not a mapping")
            try:
                prompt = _get(row, cfg.prompt_key)
            except KeyError:
                raise MalformedRowError(f"missing prompt field {cfg.prompt_key!r}") from None
            try:
                gt = _answer(row, cfg)
            except KeyError:
                raise MalformedRowError(f"missing answer field {cfg.answer_key!r}") from None
            text, ids = render_prompt(prompt, tokenizer, cfg)
        except MalformedRowError as e:
            if cfg.on_malformed == "error":
                raise MalformedRowError(f"{source}: row {i}: {e}") from None
            stats["malformed"] += 1
            log.warning("%s: row %d skipped: %s", source, i, e)
            continue
        if len(ids) > cfg.max_prompt_length:
            stats["too_long"] += 1
            continue
        examples.append(PromptExample(ids, gt, text, f"{source}:{i}"))
        if cfg.limit is not None and len(examples) >= cfg.limit:
            break
    stats["kept"] = len(examples)
    log.info("prompts from %s: %s", source, stats)
    return PromptDataset(examples, stats)


def load_prompt_dataset(cfg: PromptDataConfig, tokenizer) -> PromptDataset:
    if not cfg.path:
        raise ValueError("PromptDataConfig.path is empty")
    return build_dataset(read_rows(cfg.path, cfg.format), tokenizer, cfg, cfg.path)


def arithmetic_datasets(task_cfg, tokenizer, data_cfg: PromptDataConfig | None = None
                        ) -> tuple[PromptDataset, PromptDataset]:
    """(train, held_out) PromptDatasets for the built-in arithmetic task."""
    from .arithmetic import make_splits

    data_cfg = data_cfg or PromptDataConfig(answer_key="answer")
    out = []
    for name, rows in zip(("train", "eval"), make_splits(task_cfg)):
        ds = build_dataset(rows, tokenizer, data_cfg, f"arithmetic:{name}")
        out.append(ds)
    return out[0], out[1]
