"""Training text that exists offline everywhere, a tokenizer trained on it locally, and fixed-length
token windows.

The default corpus is the Python standard library's own source (code, docstrings and comments:
tens of MB of real text on every machine with Python). ``--data FILE`` takes plain text or
JSONL (each line an object; its ``"text"`` field, else its first string field). The tokenizer
is a byte-level BPE trained with ``tokenizers`` (a transformers dependency) on the first
megabytes of the corpus in seconds; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator

import torch

from ..ops.checks import check

TOKENIZER_BYTES = 4 * 2 ** 20  # text the BPE is trained on
EOS = "<|endoftext|>"


def stdlib_texts() -> Iterator[str]:
    """The standard library's ``.py`` files, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__"))
        for name in sorted(files):
            if name.endswith(".py"):
                try:
                    with open(os.path.join(folder, name), encoding="utf-8") as fh:
                        yield fh.read()
                except (UnicodeDecodeError, OSError):
                    continue


def file_texts(path: str) -> Iterator[str]:
    """Documents of a plain-text file (the whole file) or a JSONL file (one per line)."""
    check(os.path.isfile(path), f"--data {path!r}: no such file")
    if not path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as fh:
            yield fh.read()
        return
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"--data {path}: line {number} is not JSON ({err})") from None
            text = row.get("text") if isinstance(row, dict) else None
            if text is None and isinstance(row, dict):
                text = next((v for v in row.values() if isinstance(v, str)), None)
            check(isinstance(text, str), f"--data {path}: line {number} holds no text field")
            yield text


def texts(data: str | None) -> Iterator[str]:
    return stdlib_texts() if data is None else file_texts(data)


def train_tokenizer(data: str | None, vocab_size: int, path: str):
    """A byte-level BPE of ``vocab_size`` tokens trained on the corpus' first
    :data:`TOKENIZER_BYTES`, saved to ``path`` (a later run with the same vocabulary and data
    reuses it)."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    if os.path.isfile(path):
        tok = Tokenizer.from_file(path)
        if tok.get_vocab_size() == vocab_size:
            return tok
    sample, size = [], 0
    for text in texts(data):
        sample.append(text)
        size += len(text)
        if size >= TOKENIZER_BYTES:
            break
    check(size > 0, "the training data is empty")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(sample, vocab_size=vocab_size, special_tokens=[EOS],
                            show_progress=False)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    bpe.save(path)
    return Tokenizer.from_file(path)


class TokenWindows(torch.utils.data.Dataset):
    """``count`` windows of ``seq`` tokens cut from the corpus' documents joined by an
    end-of-text token (the corpus is read again from the start if it runs out)."""

    def __init__(self, data: str | None, tokenizer, seq: int, count: int):
        check(seq >= 2 and count >= 1, "need seq >= 2 and at least one window")
        eos = tokenizer.token_to_id(EOS)
        need = seq * count
        ids: list[int] = []
        while len(ids) < need:
            before = len(ids)
            for text in texts(data):
                ids.extend(tokenizer.encode(text).ids)
                ids.append(eos)
                if len(ids) >= need:
                    break
            check(len(ids) > before, "the training data holds no tokens")
        self.windows = torch.tensor(ids[:need], dtype=torch.long).view(count, seq)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.windows[i]
        return {"input_ids": row, "labels": row}
