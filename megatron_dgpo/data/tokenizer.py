"""A character-level tokenizer for the synthetic tasks, built with `tokenizers` and wrapped as a
`transformers.PreTrainedTokenizerFast`, so the same tokenizer.json drives the trainer, the HF
rollout engine and SGLang.

Every printable ASCII character is one token; ids 0..5 are the special tokens below. The chat
template is deliberately tiny: `<bos><|user|>{content}<|assistant|>` with the generation prompt,
and the assistant turn ends with `<eos>`.
"""
from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, BOS, EOS, UNK, USER, ASSISTANT = "<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, USER, ASSISTANT]
DEFAULT_CHARS = "".join(c for c in string.printable if c not in "\t\n\r\x0b\x0c") + "\n"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + eos_token }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer(chars: str = DEFAULT_CHARS, save_dir: str | Path | None = None):
    """Return a PreTrainedTokenizerFast; with save_dir, also write tokenizer.json and its config."""
    from transformers import PreTrainedTokenizerFast

    chars = "".join(dict.fromkeys(chars))  # dedupe, keep order so ids are stable
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters are concatenated back without separators
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        padding_side="left", chat_template=CHAT_TEMPLATE,
    )
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def load_tokenizer(path: str | Path):
    """Load any HF tokenizer directory (ours or a real model's) as a fast tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
