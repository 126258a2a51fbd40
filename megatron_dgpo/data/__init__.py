"""Prompt data: the synthetic arithmetic task, a char-level tokenizer, parquet/JSONL prompt
datasets and a resumable sampler."""
from .arithmetic import ArithmeticConfig, make_splits, solve
from .prompts import (MalformedRowError, PromptDataConfig, PromptDataset, PromptExample,
                      arithmetic_datasets, build_dataset, load_prompt_dataset, read_rows, render_prompt)
from .sampler import PromptSampler
from .tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_char_tokenizer, load_tokenizer

__all__ = [
    "ArithmeticConfig", "make_splits", "solve", "MalformedRowError", "PromptDataConfig",
    "PromptDataset", "PromptExample", "arithmetic_datasets", "build_dataset", "load_prompt_dataset",
    "read_rows", "render_prompt", "PromptSampler", "CHAT_TEMPLATE", "SPECIAL_TOKENS",
    "build_char_tokenizer", "load_tokenizer",
]
