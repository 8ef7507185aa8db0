"""Training data: JSONL documents -> fixed-length token blocks, in a deterministic order.

Each line is a JSON object with "input_ids" (a list of ints), "text" (tokenized with the model
folder's tokenizer), or "prompt" + "completion" (texts; only the positions that predict the
completion are distilled, so that a long prompt of filler does not drown out the few answer
tokens that depend on what the cache keeps). Documents are joined with the EOS token and cut
into blocks of ``seq_len`` tokens (packing; a final partial block is left-padded), or each
gets its own left-padded row (``one_per_row``). The order is a fresh seeded permutation each
epoch, and sample number p of the stream is a pure function of (seed, p), so resuming only
needs the number of samples already consumed.
"""
from __future__ import annotations

import json
import os

import torch


class DataError(ValueError):
    """A data file is missing, empty or malformed."""


class Document(list):
    """Token ids; positions predicting tokens from ``distill_from`` on are distilled."""

    def __init__(self, ids, distill_from: int = 0):
        super().__init__(ids)
        self.distill_from = distill_from

    def distilled(self) -> list[bool]:
        """Per position: does it predict a token at or after ``distill_from``?"""
        return [t + 1 >= self.distill_from for t in range(len(self))]


def read_documents(files: list[str], tokenizer=None) -> list[Document]:
    docs: list[Document] = []
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


def _token_ids(record, tokenizer, where: str) -> Document:
    if isinstance(record, dict) and "input_ids" in record:
        ids = record["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise DataError(f"{where}: 'input_ids' must be a list of non-negative ints")
        return Document(ids)
    texts = [k for k in ("text", "prompt", "completion") if isinstance(record, dict) and k in record]
    if texts == ["text"] or texts == ["prompt", "completion"]:
        if not all(isinstance(record[k], str) for k in texts):
            raise DataError(f"{where}: {' and '.join(repr(k) for k in texts)} must be strings")
        if tokenizer is None:
            raise DataError(f"{where}: has text but the model folder has no tokenizer; add one or give 'input_ids'")
        if texts == ["text"]:
            return Document(tokenizer(record["text"])["input_ids"])
        prompt = list(tokenizer(record["prompt"])["input_ids"])
        completion = list(tokenizer(record["completion"], add_special_tokens=False)["input_ids"])
        if not completion:
            raise DataError(f"{where}: 'completion' holds no tokens")
        return Document(prompt + completion, distill_from=len(prompt))
    raise DataError(f"{where}: expected a JSON object with 'text', 'prompt' + 'completion', or 'input_ids'")


def _with_eos(doc: list[int], eos_id: int | None) -> tuple[list[int], list[bool]]:
    """The document's ids (+ EOS unless it ends with one) and its distilled positions."""
    distilled = doc.distilled() if isinstance(doc, Document) else [True] * len(doc)
    if eos_id is not None and doc and doc[-1] != eos_id:
        return list(doc) + [eos_id], distilled + [True]
    return list(doc), distilled


def pack(docs: list[list[int]], seq_len: int, eos_id: int | None, pad_id: int):
    """(input_ids long [N, seq_len], real bool [N, seq_len], distilled bool [N, seq_len]); the
    last block left-padded."""
    stream: list[int] = []
    distill: list[bool] = []
    for doc in docs:
        ids, dist = _with_eos(doc, eos_id)
        stream += ids
        distill += dist
    if not stream:
        raise DataError("the data files hold no tokens")
    n = -(-len(stream) // seq_len)
    ids = torch.full((n * seq_len,), pad_id, dtype=torch.long)
    real = torch.zeros(n * seq_len, dtype=torch.bool)
    distilled = torch.zeros(n * seq_len, dtype=torch.bool)
    pad = n * seq_len - len(stream)
    # Left padding of the last block: shift the stream's tail right by `pad` inside it.
    cut = (n - 1) * seq_len
    ids[:cut] = torch.tensor(stream[:cut], dtype=torch.long)
    ids[cut + pad:] = torch.tensor(stream[cut:], dtype=torch.long)
    distilled[:cut] = torch.tensor(distill[:cut])
    distilled[cut + pad:] = torch.tensor(distill[cut:])
    real[:cut] = True
    real[cut + pad:] = True
    return ids.view(n, seq_len), real.view(n, seq_len), distilled.view(n, seq_len)


def one_per_row(docs: list[list[int]], seq_len: int, eos_id: int | None, pad_id: int):
    """Like ``pack`` but each document (+ EOS) gets its own left-padded row, so no sequence mixes
    documents; a document longer than ``seq_len`` is an error rather than silently cut."""
    rows = [_with_eos(doc, eos_id) for doc in docs if doc]
    if not rows:
        raise DataError("the data files hold no tokens")
    longest = max(range(len(rows)), key=lambda i: len(rows[i][0]))
    if len(rows[longest][0]) > seq_len:
        raise DataError(f"document {longest} has {len(rows[longest][0])} tokens (with EOS), more than "
                        f"seq_len={seq_len}; raise seq_len or pack the documents")
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    real = torch.zeros(len(rows), seq_len, dtype=torch.bool)
    distilled = torch.zeros(len(rows), seq_len, dtype=torch.bool)
    for i, (r, d) in enumerate(rows):
        ids[i, seq_len - len(r):] = torch.tensor(r, dtype=torch.long)
        real[i, seq_len - len(r):] = True
        distilled[i, seq_len - len(r):] = torch.tensor(d)
    return ids, real, distilled


class SampleStream:
    """Sample p of an endless stream = block perm_{p // N}[p % N]; perm_e seeded by (seed, e)."""

    def __init__(self, ids: torch.Tensor, real: torch.Tensor, distilled: torch.Tensor, seed: int):
        self.ids, self.real, self.distilled, self.seed = ids, real, distilled, seed
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.ids.shape[0]

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self), generator=g)}
        return self._perms[epoch]

    def batch(self, positions: range):
        """Rows ``positions`` of the stream, without the columns that are padding in every row:
        rows are left-padded and positions come from the padding mask, so the cost follows the
        batch's longest document instead of seq_len. The loss is unchanged up to the Gumbel noise,
        whose draws follow the batch's shape."""
        idx = torch.stack([self._perm(p // len(self))[p % len(self)] for p in positions])
        real = self.real[idx]
        first = int(real.any(0).int().argmax())
        return self.ids[idx, first:], real[:, first:], self.distilled[idx, first:]
