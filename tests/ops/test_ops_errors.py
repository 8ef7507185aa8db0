"""Bad input to every torch.ops.dms operator: each case must raise a RuntimeError with the
operator's full message (naming the offending argument and what was expected), and a refused
append must leave the store untouched.

The second half lists cache states that another engine could hand over corrupted (ring slots,
page ids, counters): the CPU kernels must reject them before reading or writing out of bounds.
Cases that can crash the process run in a subprocess.
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch

import dms  # noqa: F401  (loads the ops)

ops = torch.ops.dms
i32, f32, f16 = torch.int32, torch.float32, torch.float16


def zeros_b(*shape):
    return torch.zeros(*shape, dtype=torch.bool)


def store(S=2, P=8, page_size=4, max_pages=4, window=2, D=3):
    """The nine state tensors of an empty store, in schema order."""
    return dict(k_pages=torch.zeros(P, page_size, D), v_pages=torch.zeros(P, page_size, D),
                block_table=torch.full((S, max_pages), -1, dtype=i32), seq_lens=torch.zeros(S, dtype=i32),
                num_seen=torch.zeros(S, dtype=i32), ring_slots=torch.zeros(S, window + 1, dtype=i32),
                ring_flags=zeros_b(S, window + 1), free_pages=torch.arange(P, dtype=i32),
                free_top=torch.tensor([P], dtype=i32))


def append(st, k=None, v=None, decisions=None, valid=None, T=2, D=3):
    S = st["num_seen"].shape[0]
    k = torch.ones(S, T, D) if k is None else k
    v = torch.ones(S, T, D) if v is None else v
    decisions = zeros_b(S, T) if decisions is None else decisions
    ops.append(*st.values(), k, v, decisions, valid)


def filled_store(**kw):
    """A store holding 3 tokens per sequence (window 2, nothing evicted yet)."""
    st = store(**kw)
    append(st, T=3)
    return st


def with_state(key, value):
    def call():
        st = filled_store()
        st[key] = value
        append(st)
    return call


def with_chunk(**chunk):
    return lambda: append(store(), **chunk)


def paged(pages=None, block_table=None, seq_lens=None):
    """gather_varlen arguments: 2 sequences of 3 and 1 live slots in pages of 2."""
    pages = torch.randn(4, 2, 3) if pages is None else pages
    block_table = torch.tensor([[0, 1], [2, -1]], dtype=i32) if block_table is None else block_table
    seq_lens = torch.tensor([3, 1], dtype=i32) if seq_lens is None else seq_lens
    return pages, block_table, seq_lens


def attention(q=None, k_pages=None, v_pages=None, block_table=None, seq_lens=None, scale=0.5):
    pages, bt, lens = paged(k_pages, block_table, seq_lens)
    q = torch.randn(2, 2, 3) if q is None else q
    return lambda: ops.paged_decode_attention(q, pages, pages.clone() if v_pages is None else v_pages, bt, lens,
                                              scale)


def gather(**kw):
    return lambda: ops.gather_varlen(*paged(**kw))


def scan(decisions=None, valid=None, window=1):
    return lambda: ops.scan_flags(zeros_b(2, 5) if decisions is None else decisions, valid, window)


def compact(x=None, keep=None):
    return lambda: ops.compact(torch.randn(2, 5, 3) if x is None else x, zeros_b(2, 5) if keep is None else keep)


def strided(t):
    """Same shape and dtype as t, not contiguous."""
    return torch.cat([t, t], dim=-1)[..., ::2] if t.dim() else t


BAD_INPUTS = {
    # scan_flags
    "scan/decisions float": (scan(decisions=torch.zeros(2, 5)), "dms.scan_flags: decisions must be Bool, got Float"),
    "scan/decisions rank 1": (scan(decisions=zeros_b(5)), "dms.scan_flags: decisions must be [S, T], got shape [5]"),
    "scan/decisions rank 3": (scan(decisions=zeros_b(2, 5, 1)),
        "dms.scan_flags: decisions must be [S, T], got shape [2, 5, 1]"),
    "scan/decisions strided": (scan(decisions=strided(zeros_b(2, 5))), "dms.scan_flags: decisions must be contiguous"),
    "scan/window negative": (scan(window=-1), "dms.scan_flags: window must be >= 0, got -1"),
    "scan/window very negative": (scan(window=-(2**40)), "dms.scan_flags: window must be >= 0, got -1099511627776"),
    "scan/valid shape": (scan(valid=zeros_b(2, 4)),
        "dms.scan_flags: valid must be [S, T] like decisions (size 5 in dim 1), got shape [2, 4]"),
    "scan/valid batch": (scan(valid=zeros_b(3, 5)),
        "dms.scan_flags: valid must be [S, T] like decisions (size 2 in dim 0), got shape [3, 5]"),
    "scan/valid int": (scan(valid=torch.ones(2, 5, dtype=i32)), "dms.scan_flags: valid must be Bool, got Int"),
    "scan/valid strided": (scan(valid=strided(zeros_b(2, 5))), "dms.scan_flags: valid must be contiguous"),
    # compact
    "compact/x int": (compact(x=torch.zeros(2, 5, 3, dtype=i32)),
        "dms.compact: x must be float32, float16 or bfloat16, got Int"),
    "compact/x float64": (compact(x=torch.zeros(2, 5, 3, dtype=torch.float64)),
        "dms.compact: x must be float32, float16 or bfloat16, got Double"),
    "compact/x rank 2": (compact(x=torch.zeros(2, 5)), "dms.compact: x must be [S, T, D], got shape [2, 5]"),
    "compact/x strided": (compact(x=strided(torch.zeros(2, 5, 3))), "dms.compact: x must be contiguous"),
    "compact/keep float": (compact(keep=torch.zeros(2, 5)), "dms.compact: keep must be Bool, got Float"),
    "compact/keep shape": (compact(keep=zeros_b(2, 6)),
        "dms.compact: keep must be [S, T] like x's first two dims (size 5 in dim 1), got shape [2, 6]"),
    "compact/keep batch": (compact(keep=zeros_b(1, 5)),
        "dms.compact: keep must be [S, T] like x's first two dims (size 2 in dim 0), got shape [1, 5]"),
    "compact/keep strided": (compact(keep=strided(zeros_b(2, 5))), "dms.compact: keep must be contiguous"),
    # gather_varlen
    "gather/pages int": (gather(pages=torch.zeros(4, 2, 3, dtype=i32)),
        "dms.gather_varlen: pages must be float32, float16 or bfloat16, got Int"),
    "gather/pages rank 2": (gather(pages=torch.zeros(8, 3)),
        "dms.gather_varlen: pages must be [P, page_size, D], got shape [8, 3]"),
    "gather/pages strided": (gather(pages=strided(torch.zeros(4, 2, 3))),
        "dms.gather_varlen: pages must be contiguous"),
    "gather/page_size 0": (gather(pages=torch.zeros(4, 0, 3)),
        "dms.gather_varlen: pages must have page_size >= 1, got shape [4, 0, 3]"),
    "gather/block_table int64": (gather(block_table=torch.tensor([[0, 1], [2, -1]])),
        "dms.gather_varlen: block_table must be Int, got Long"),
    "gather/block_table rank 1": (gather(block_table=torch.tensor([0, 1], dtype=i32)),
        "dms.gather_varlen: block_table must be [S, max_pages], got shape [2]"),
    "gather/block_table strided": (gather(block_table=torch.tensor([[0, 9, 1, 9], [2, 9, -1, 9]], dtype=i32)[:, ::2]),
        "dms.gather_varlen: block_table must be contiguous"),
    "gather/block_table page id >= P": (gather(block_table=torch.tensor([[0, 4], [2, -1]], dtype=i32)),
        "dms.gather_varlen: block_table[0, 1] = 4 must be a page id in [0, 4) for a live slot"),
    "gather/block_table page id -1 live": (gather(block_table=torch.tensor([[0, -1], [2, -1]], dtype=i32)),
        "dms.gather_varlen: block_table[0, 1] = -1 must be a page id in [0, 4) for a live slot"),
    "gather/block_table page id very negative": (gather(block_table=torch.tensor([[0, 1], [-2**31, -1]], dtype=i32)),
        "dms.gather_varlen: block_table[1, 0] = -2147483648 must be a page id in [0, 4) for a live slot"),
    "gather/seq_lens int64": (gather(seq_lens=torch.tensor([3, 1])),
        "dms.gather_varlen: seq_lens must be Int, got Long"),
    "gather/seq_lens batch": (gather(seq_lens=torch.tensor([3, 1, 0], dtype=i32)),
        "dms.gather_varlen: seq_lens must be [S] (size 2 in dim 0), got shape [3]"),
    "gather/seq_lens > capacity": (gather(seq_lens=torch.tensor([5, 1], dtype=i32)),
        "dms.gather_varlen: seq_lens[0] = 5 must be in [0, max_pages * page_size = 4]"),
    "gather/seq_lens negative": (gather(seq_lens=torch.tensor([3, -1], dtype=i32)),
        "dms.gather_varlen: seq_lens[1] = -1 must be in [0, max_pages * page_size = 4]"),
    "gather/seq_lens int32 max": (gather(seq_lens=torch.tensor([3, 2**31 - 1], dtype=i32)),
        "dms.gather_varlen: seq_lens[1] = 2147483647 must be in [0, max_pages * page_size = 4]"),
    # paged_decode_attention
    "attention/q int": (attention(q=torch.zeros(2, 2, 3, dtype=i32)),
        "dms.paged_decode_attention: q must be float32, float16 or bfloat16, got Int"),
    "attention/q rank 2": (attention(q=torch.zeros(2, 3)),
        "dms.paged_decode_attention: q must be [S, G, D], got shape [2, 3]"),
    "attention/q strided": (attention(q=strided(torch.zeros(2, 2, 3))),
        "dms.paged_decode_attention: q must be contiguous"),
    "attention/q head dim": (attention(q=torch.zeros(2, 2, 4)),
        "dms.paged_decode_attention: k_pages must be [P, page_size, D] with q's D (size 4 in dim 2), "
        "got shape [4, 2, 3]"),
    "attention/q batch": (attention(q=torch.zeros(3, 2, 3)),
        "dms.paged_decode_attention: block_table must be [S, max_pages] (size 3 in dim 0), got shape [2, 2]"),
    "attention/k_pages dtype": (attention(k_pages=torch.zeros(4, 2, 3, dtype=f16)),
        "dms.paged_decode_attention: k_pages must be Float, got Half"),
    "attention/v_pages dtype": (attention(v_pages=torch.zeros(4, 2, 3, dtype=f16)),
        "dms.paged_decode_attention: v_pages must be Float, got Half"),
    "attention/v_pages shape": (attention(v_pages=torch.zeros(5, 2, 3)),
        "dms.paged_decode_attention: v_pages must be [P, page_size, D] like k_pages (size 4 in dim 0), "
        "got shape [5, 2, 3]"),
    "attention/v_pages strided": (attention(v_pages=strided(torch.zeros(4, 2, 3))),
        "dms.paged_decode_attention: v_pages must be contiguous"),
    "attention/page_size 0": (attention(k_pages=torch.zeros(4, 0, 3)),
        "dms.paged_decode_attention: k_pages must have page_size >= 1, got shape [4, 0, 3]"),
    "attention/block_table page id >= P": (attention(block_table=torch.tensor([[0, 9], [2, -1]], dtype=i32)),
        "dms.paged_decode_attention: block_table[0, 1] = 9 must be a page id in [0, 4) for a live slot"),
    "attention/block_table page id -1 live": (attention(block_table=torch.tensor([[-1, 1], [2, -1]], dtype=i32)),
        "dms.paged_decode_attention: block_table[0, 0] = -1 must be a page id in [0, 4) for a live slot"),
    "attention/seq_lens > capacity": (attention(seq_lens=torch.tensor([3, 5], dtype=i32)),
        "dms.paged_decode_attention: seq_lens[1] = 5 must be in [0, max_pages * page_size = 4]"),
    "attention/seq_lens negative": (attention(seq_lens=torch.tensor([-3, 1], dtype=i32)),
        "dms.paged_decode_attention: seq_lens[0] = -3 must be in [0, max_pages * page_size = 4]"),
    # append: the chunk
    "append/k int": (with_chunk(k=torch.ones(2, 2, 3, dtype=i32)),
        "dms.append: k must be float32, float16 or bfloat16, got Int"),
    "append/k rank 2": (with_chunk(k=torch.ones(2, 3)), "dms.append: k must be [S, T, D], got shape [2, 3]"),
    "append/k strided": (with_chunk(k=strided(torch.ones(2, 2, 3))), "dms.append: k must be contiguous"),
    "append/k head dim": (with_chunk(k=torch.ones(2, 2, 4), v=torch.ones(2, 2, 4)),
        "dms.append: k_pages must be [P, page_size, D] with k's D (size 4 in dim 2), got shape [8, 4, 3]"),
    "append/k batch": (with_chunk(k=torch.ones(3, 2, 3), v=torch.ones(3, 2, 3), decisions=zeros_b(3, 2)),
        "dms.append: block_table must be [S, max_pages] (size 3 in dim 0), got shape [2, 4]"),
    "append/k dtype vs pages": (with_chunk(k=torch.ones(2, 2, 3, dtype=f16), v=torch.ones(2, 2, 3, dtype=f16)),
        "dms.append: k_pages must be Half, got Float"),
    "append/v shape": (with_chunk(v=torch.ones(2, 3, 3)),
        "dms.append: v must be [S, T, D] like k (size 2 in dim 1), got shape [2, 3, 3]"),
    "append/v dtype": (with_chunk(v=torch.ones(2, 2, 3, dtype=f16)), "dms.append: v must be Float, got Half"),
    "append/decisions float": (with_chunk(decisions=torch.zeros(2, 2)),
        "dms.append: decisions must be Bool, got Float"),
    "append/decisions shape": (with_chunk(decisions=zeros_b(2, 3)),
        "dms.append: decisions must be [S, T] like k (size 2 in dim 1), got shape [2, 3]"),
    "append/decisions strided": (with_chunk(decisions=strided(zeros_b(2, 2))),
        "dms.append: decisions must be contiguous"),
    "append/valid shape": (with_chunk(valid=zeros_b(2, 1)),
        "dms.append: valid must be [S, T] like k (size 2 in dim 1), got shape [2, 1]"),
    "append/valid float": (with_chunk(valid=torch.ones(2, 2)), "dms.append: valid must be Bool, got Float"),
    # append: the store
    "append/k_pages rank": (with_state("k_pages", torch.zeros(8, 12)),
        "dms.append: k_pages must be [P, page_size, D], got shape [8, 12]"),
    "append/k_pages strided": (with_state("k_pages", strided(torch.zeros(8, 4, 3))),
        "dms.append: k_pages must be contiguous"),
    "append/page_size 0": (with_state("k_pages", torch.zeros(8, 0, 3)),
        "dms.append: k_pages must have page_size >= 1, got shape [8, 0, 3]"),
    "append/v_pages pool size": (with_state("v_pages", torch.zeros(7, 4, 3)),
        "dms.append: v_pages must be [P, page_size, D] like k_pages (size 8 in dim 0), got shape [7, 4, 3]"),
    "append/block_table int64": (with_state("block_table", torch.full((2, 4), -1)),
        "dms.append: block_table must be Int, got Long"),
    "append/block_table batch": (with_state("block_table", torch.full((3, 4), -1, dtype=i32)),
        "dms.append: block_table must be [S, max_pages] (size 2 in dim 0), got shape [3, 4]"),
    "append/seq_lens > capacity": (with_state("seq_lens", torch.tensor([3, 17], dtype=i32)),
        "dms.append: seq_lens[1] = 17 must be in [0, max_pages * page_size = 16]"),
    "append/seq_lens negative": (with_state("seq_lens", torch.tensor([-1, 3], dtype=i32)),
        "dms.append: seq_lens[0] = -1 must be in [0, max_pages * page_size = 16]"),
    "append/num_seen < seq_lens": (with_state("num_seen", torch.tensor([3, 2], dtype=i32)),
        "dms.append: corrupt state of sequence 1: num_seen = 2 < seq_lens = 3"),
    "append/num_seen shape": (with_state("num_seen", torch.zeros(2, 1, dtype=i32)),
        "dms.append: num_seen must be [S], got shape [2, 1]"),
    "append/ring_slots window -1": (with_state("ring_slots", torch.zeros(2, 0, dtype=i32)),
        "dms.append: ring_slots must be [S, window + 1] with window >= 0, got shape [2, 0]"),
    "append/ring_slots int64": (with_state("ring_slots", torch.zeros(2, 3, dtype=torch.int64)),
        "dms.append: ring_slots must be Int, got Long"),
    "append/ring_flags width": (with_state("ring_flags", zeros_b(2, 4)),
        "dms.append: ring_flags must be [S, window + 1] like ring_slots (size 3 in dim 1), got shape [2, 4]"),
    "append/ring_flags int": (with_state("ring_flags", torch.zeros(2, 3, dtype=i32)),
        "dms.append: ring_flags must be Bool, got Int"),
    "append/free_pages length": (with_state("free_pages", torch.arange(7, dtype=i32)),
        "dms.append: free_pages must be [P] (P = k_pages.size(0)) (size 8 in dim 0), got shape [7]"),
    "append/free_pages int64": (with_state("free_pages", torch.arange(8)),
        "dms.append: free_pages must be Int, got Long"),
    "append/free_pages id >= P": (with_state("free_pages", torch.tensor([0, 1, 2, 3, 4, 99, 6, 7], dtype=i32)),
        "dms.append: free_pages[5] = 99 is not a page id in [0, 8)"),
    "append/free_pages id negative": (with_state("free_pages", torch.tensor([0, 1, 2, 3, 4, -5, 6, 7], dtype=i32)),
        "dms.append: free_pages[5] = -5 is not a page id in [0, 8)"),
    "append/free_top > P": (with_state("free_top", torch.tensor([9], dtype=i32)),
        "dms.append: free_top = 9 must be in [0, P = 8]"),
    "append/free_top negative": (with_state("free_top", torch.tensor([-1], dtype=i32)),
        "dms.append: free_top = -1 must be in [0, P = 8]"),
    "append/free_top shape": (with_state("free_top", torch.tensor([6, 6], dtype=i32)),
        "dms.append: free_top must be [1] (size 1 in dim 0), got shape [2]"),
}


def whole_line(message: str) -> str:
    """A pattern matching ``message`` as a whole line of the error (torch may add lines around it)."""
    return f"(?m)^{re.escape(message)}$"


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_rejected_with_its_message(case):
    call, message = BAD_INPUTS[case]
    with pytest.raises(RuntimeError, match=whole_line(message)):
        call()


def _refused(mutate, message):
    """(state before, state after) of an append that must raise ``message``."""
    st = filled_store()
    mutate(st)
    before = {k: t.clone() for k, t in st.items()}
    with pytest.raises(RuntimeError, match=whole_line(message)):
        append(st, k=torch.full((2, 2, 3), 5.0), decisions=torch.ones(2, 2, dtype=torch.bool))
    return before, st


def assert_untouched(before, after):
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"a refused append modified {changed}"


@pytest.mark.parametrize("mutate,message", [
    (lambda st: st["free_top"].fill_(0), "dms.append: page pool exhausted: need 2 pages, 0 free"),
    (lambda st: st.update(block_table=st["block_table"][:, :1].contiguous()),
     "dms.append: block_table has room for 1 pages per sequence; sequence 0 needs more"),
    (lambda st: st["free_pages"].__setitem__(int(st["free_top"][0]) - 1, 8),  # next popped id out of range
     "dms.append: free_pages[5] = 8 is not a page id in [0, 8)"),
], ids=["pool exhausted", "row too short", "popped id out of range"])
def test_refused_append_writes_nothing(mutate, message):
    before, after = _refused(mutate, message)
    assert_untouched(before, after)


# ---- corrupted cache state: rejected before any read or write out of bounds ----

def _run_isolated(body: str) -> str:
    """Runs ``body`` (which defines ``call()``) in a fresh interpreter: a kernel that writes out of
    bounds may abort or corrupt the heap, which must not take the test run with it. Returns
    "RAISED <message>" or "NO ERROR", or fails on a crash."""
    code = textwrap.dedent("""
        import torch, dms
        ops = torch.ops.dms
        i32 = torch.int32
        def store(S, P, ps, mp, w, D):
            return [torch.zeros(P, ps, D), torch.zeros(P, ps, D), torch.full((S, mp), -1, dtype=i32),
                    torch.zeros(S, dtype=i32), torch.zeros(S, dtype=i32), torch.zeros(S, w + 1, dtype=i32),
                    torch.zeros(S, w + 1, dtype=torch.bool), torch.arange(P, dtype=i32),
                    torch.tensor([P], dtype=i32)]
        def append(st, T, evict=False):
            S, D = st[2].shape[0], st[0].shape[2]
            d = torch.full((S, T), evict, dtype=torch.bool)
            ops.append(*st, torch.ones(S, T, D), torch.ones(S, T, D), d, None)
    """) + textwrap.dedent(body) + textwrap.dedent("""
        try:
            call()
            print("NO ERROR")
        except RuntimeError as e:
            print("RAISED", str(e).splitlines()[0])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, f"the op crashed the process (exit {proc.returncode}): {proc.stderr[-400:]}"
    return proc.stdout.strip().splitlines()[-1]


def test_append_rejects_num_seen_near_int32_max():
    """num_seen + T overflows int32: the ring column (n % W1) goes negative and the kernel writes
    before ring_slots (heap corruption, 'double free or corruption' at exit)."""
    out = _run_isolated("""
        def call():
            st = store(1, 4, 2, 4, 1, 2)
            st[4].fill_(2**31 - 2)
            append(st, 4)
    """)
    assert out == "RAISED dms.append: num_seen[0] = 2147483646 + 4 new tokens overflows int32", out


def test_append_rejects_ring_slot_beyond_the_block_table():
    """A flagged token leaving the window hands over ring_slots[s, col]; a value past
    max_pages * page_size indexes block_table out of bounds (segfault)."""
    out = _run_isolated("""
        def call():
            st = store(1, 4, 2, 4, 1, 2)
            append(st, 3)
            st[6].fill_(True)
            st[5].fill_(10**6)
            append(st, 1, evict=True)
    """)
    assert out == ("RAISED dms.append: ring_slots[0, 1] = 1000000 is handed over to a new token but is not a "
                   "live slot in [0, seq_lens = 3)"), out


def test_append_rejects_negative_ring_slot_before_writing():
    """A negative ring slot reads block_table[s, slot / page_size] before the row (out of
    bounds) and is only caught after the ring was updated, with a message not naming ring_slots."""
    before, after = _refused(lambda st: (st["ring_flags"].fill_(True), st["ring_slots"].fill_(-7)),
                             "dms.append: ring_slots[0, 0] = -7 is handed over to a new token but is not a live "
                             "slot in [0, seq_lens = 3)")
    assert_untouched(before, after)


def test_append_rejects_bad_live_page_id_before_writing():
    """A live page of sequence 1 with id -1: caught only while writing, after sequence 0 was
    written (k_pages, seq_lens, num_seen, ring of sequence 0 changed)."""
    def mutate(st):
        st["block_table"][1, 0] = -1
    before, after = _refused(mutate, "dms.append: block_table[1, 0] = -1 must be a page id in [0, 8) for a live slot")
    assert_untouched(before, after)


def test_append_rejects_duplicate_free_page_ids():
    """Two sequences popping the same page id share a page and overwrite each other's keys."""
    st = store()
    st["free_pages"].fill_(3)
    message = "dms.append: free_pages[6:8] (the ids to pop) hold page 3 twice"
    with pytest.raises(RuntimeError, match=whole_line(message)):
        append(st, T=1)


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_paged_decode_attention_rejects_non_finite_scale(scale):
    message = f"dms.paged_decode_attention: scale must be finite in float32, got {scale}"
    with pytest.raises(RuntimeError, match=whole_line(message)):
        attention(scale=scale)()
