"""Training data: JSONL documents -> fixed-length token blocks, in a deterministic order.

Each line is a JSON object with "input_ids" (a list of ints) or "text" (tokenized with the
model folder's tokenizer). Documents are joined with the EOS token and cut into blocks of
``seq_len`` tokens (packing); a final partial block is left-padded. The order is a fresh
seeded permutation each epoch, and sample number p of the stream is a pure function of
(seed, p), so resuming only needs the number of samples already consumed.
"""
from __future__ import annotations

import json
import os

import torch


class DataError(ValueError):
    """A data file is missing, empty or malformed."""


def read_documents(files: list[str], tokenizer=None) -> list[list[int]]:
    docs: list[list[int]] = []
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"data file {path!r} does not exist")
        n_before = len(docs)
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                docs.append(_token_ids(record, tokenizer, f"{path}:{line_no}"))
        if len(docs) == n_before:
            raise DataError(f"data file {path!r} is empty (expected JSONL lines with 'text' or 'input_ids')")
    return docs


def _token_ids(record, tokenizer, where: str) -> list[int]:
    if isinstance(record, dict) and "input_ids" in record:
        ids = record["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise DataError(f"{where}: 'input_ids' must be a list of non-negative ints")
        return ids
    if isinstance(record, dict) and "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: 'text' must be a string")
        if tokenizer is None:
            raise DataError(f"{where}: has 'text' but the model folder has no tokenizer; "
                            "add one or give 'input_ids'")
        return list(tokenizer(record["text"])["input_ids"])
    raise DataError(f"{where}: expected a JSON object with 'text' or 'input_ids'")


def pack(docs: list[list[int]], seq_len: int, eos_id: int | None, pad_id: int):
    """(input_ids long [N, seq_len], real bool [N, seq_len]); the last block left-padded."""
    stream: list[int] = []
    for doc in docs:
        stream.extend(doc)
        if eos_id is not None and doc and doc[-1] != eos_id:
            stream.append(eos_id)
    if not stream:
        raise DataError("the data files hold no tokens")
    n = -(-len(stream) // seq_len)
    ids = torch.full((n * seq_len,), pad_id, dtype=torch.long)
    real = torch.zeros(n * seq_len, dtype=torch.bool)
    pad = n * seq_len - len(stream)
    # Left padding of the last block: shift the stream's tail right by `pad` inside it.
    cut = (n - 1) * seq_len
    ids[:cut] = torch.tensor(stream[:cut], dtype=torch.long)
    ids[cut + pad:] = torch.tensor(stream[cut:], dtype=torch.long)
    real[:cut] = True
    real[cut + pad:] = True
    return ids.view(n, seq_len), real.view(n, seq_len)


def one_per_row(docs: list[list[int]], seq_len: int, eos_id: int | None, pad_id: int):
    """Like ``pack`` but each document (+ EOS) gets its own left-padded row, so no sequence mixes
    documents; a document longer than ``seq_len`` is an error rather than silently cut."""
    rows = [doc + [eos_id] if eos_id is not None and doc and doc[-1] != eos_id else doc for doc in docs]
    rows = [r for r in rows if r]
    if not rows:
        raise DataError("the data files hold no tokens")
    longest = max(range(len(rows)), key=lambda i: len(rows[i]))
    if len(rows[longest]) > seq_len:
        raise DataError(f"document {longest} has {len(rows[longest])} tokens (with EOS), more than "
                        f"seq_len={seq_len}; raise seq_len or pack the documents")
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    real = torch.zeros(len(rows), seq_len, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, seq_len - len(r):] = torch.tensor(r, dtype=torch.long)
        real[i, seq_len - len(r):] = True
    return ids, real


class SampleStream:
    """Sample p of an endless stream = block perm_{p // N}[p % N]; perm_e seeded by (seed, e)."""

    def __init__(self, ids: torch.Tensor, real: torch.Tensor, seed: int):
        self.ids, self.real, self.seed = ids, real, seed
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.ids.shape[0]

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self), generator=g)}
        return self._perms[epoch]

    def batch(self, positions: range):
        idx = torch.stack([self._perm(p // len(self))[p % len(self)] for p in positions])
        return self.ids[idx], self.real[idx]
