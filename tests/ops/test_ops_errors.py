"""Bad input to every torch.ops.dms operator: each case must raise a RuntimeError whose message
names the offending argument, and a refused append must leave the store untouched.

The second half lists cache states that another engine could hand over corrupted (ring slots,
page ids, counters): the CPU kernels must reject them before reading or writing out of bounds.
Cases that can crash the process run in a subprocess.
"""
from __future__ import annotations

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
    "scan/decisions float": (scan(decisions=torch.zeros(2, 5)), "decisions"),
    "scan/decisions rank 1": (scan(decisions=zeros_b(5)), "decisions"),
    "scan/decisions rank 3": (scan(decisions=zeros_b(2, 5, 1)), "decisions"),
    "scan/decisions strided": (scan(decisions=strided(zeros_b(2, 5))), "decisions"),
    "scan/window negative": (scan(window=-1), "window"),
    "scan/window very negative": (scan(window=-(2**40)), "window"),
    "scan/valid shape": (scan(valid=zeros_b(2, 4)), "valid"),
    "scan/valid batch": (scan(valid=zeros_b(3, 5)), "valid"),
    "scan/valid int": (scan(valid=torch.ones(2, 5, dtype=i32)), "valid"),
    "scan/valid strided": (scan(valid=strided(zeros_b(2, 5))), "valid"),
    # compact
    "compact/x int": (compact(x=torch.zeros(2, 5, 3, dtype=i32)), "x"),
    "compact/x float64": (compact(x=torch.zeros(2, 5, 3, dtype=torch.float64)), "x"),
    "compact/x rank 2": (compact(x=torch.zeros(2, 5)), "x"),
    "compact/x strided": (compact(x=strided(torch.zeros(2, 5, 3))), "x"),
    "compact/keep float": (compact(keep=torch.zeros(2, 5)), "keep"),
    "compact/keep shape": (compact(keep=zeros_b(2, 6)), "keep"),
    "compact/keep batch": (compact(keep=zeros_b(1, 5)), "keep"),
    "compact/keep strided": (compact(keep=strided(zeros_b(2, 5))), "keep"),
    # gather_varlen
    "gather/pages int": (gather(pages=torch.zeros(4, 2, 3, dtype=i32)), "pages"),
    "gather/pages rank 2": (gather(pages=torch.zeros(8, 3)), "pages"),
    "gather/pages strided": (gather(pages=strided(torch.zeros(4, 2, 3))), "pages"),
    "gather/page_size 0": (gather(pages=torch.zeros(4, 0, 3)), "page_size"),
    "gather/block_table int64": (gather(block_table=torch.tensor([[0, 1], [2, -1]])), "block_table"),
    "gather/block_table rank 1": (gather(block_table=torch.tensor([0, 1], dtype=i32)), "block_table"),
    "gather/block_table strided": (gather(block_table=torch.tensor([[0, 9, 1, 9], [2, 9, -1, 9]], dtype=i32)[:, ::2]),
                                   "block_table"),
    "gather/block_table page id >= P": (gather(block_table=torch.tensor([[0, 4], [2, -1]], dtype=i32)), "block_table"),
    "gather/block_table page id -1 live": (gather(block_table=torch.tensor([[0, -1], [2, -1]], dtype=i32)),
                                          "block_table"),
    "gather/block_table page id very negative": (gather(block_table=torch.tensor([[0, 1], [-2**31, -1]], dtype=i32)),
                                                 "block_table"),
    "gather/seq_lens int64": (gather(seq_lens=torch.tensor([3, 1])), "seq_lens"),
    "gather/seq_lens batch": (gather(seq_lens=torch.tensor([3, 1, 0], dtype=i32)), "seq_lens"),
    "gather/seq_lens > capacity": (gather(seq_lens=torch.tensor([5, 1], dtype=i32)), "seq_lens"),
    "gather/seq_lens negative": (gather(seq_lens=torch.tensor([3, -1], dtype=i32)), "seq_lens"),
    "gather/seq_lens int32 max": (gather(seq_lens=torch.tensor([3, 2**31 - 1], dtype=i32)), "seq_lens"),
    # paged_decode_attention
    "attention/q int": (attention(q=torch.zeros(2, 2, 3, dtype=i32)), "q"),
    "attention/q rank 2": (attention(q=torch.zeros(2, 3)), "q"),
    "attention/q strided": (attention(q=strided(torch.zeros(2, 2, 3))), "q"),
    "attention/q head dim": (attention(q=torch.zeros(2, 2, 4)), "k_pages"),
    "attention/q batch": (attention(q=torch.zeros(3, 2, 3)), "block_table"),
    "attention/k_pages dtype": (attention(k_pages=torch.zeros(4, 2, 3, dtype=f16)), "k_pages"),
    "attention/v_pages dtype": (attention(v_pages=torch.zeros(4, 2, 3, dtype=f16)), "v_pages"),
    "attention/v_pages shape": (attention(v_pages=torch.zeros(5, 2, 3)), "v_pages"),
    "attention/v_pages strided": (attention(v_pages=strided(torch.zeros(4, 2, 3))), "v_pages"),
    "attention/page_size 0": (attention(k_pages=torch.zeros(4, 0, 3)), "page_size"),
    "attention/block_table page id >= P": (attention(block_table=torch.tensor([[0, 9], [2, -1]], dtype=i32)),
                                           "block_table"),
    "attention/block_table page id -1 live": (attention(block_table=torch.tensor([[-1, 1], [2, -1]], dtype=i32)),
                                              "block_table"),
    "attention/seq_lens > capacity": (attention(seq_lens=torch.tensor([3, 5], dtype=i32)), "seq_lens"),
    "attention/seq_lens negative": (attention(seq_lens=torch.tensor([-3, 1], dtype=i32)), "seq_lens"),
    # append: the chunk
    "append/k int": (with_chunk(k=torch.ones(2, 2, 3, dtype=i32)), "k"),
    "append/k rank 2": (with_chunk(k=torch.ones(2, 3)), "k"),
    "append/k strided": (with_chunk(k=strided(torch.ones(2, 2, 3))), "k"),
    "append/k head dim": (with_chunk(k=torch.ones(2, 2, 4), v=torch.ones(2, 2, 4)), "k_pages"),
    "append/k batch": (with_chunk(k=torch.ones(3, 2, 3), v=torch.ones(3, 2, 3), decisions=zeros_b(3, 2)),
                       "block_table"),
    "append/k dtype vs pages": (with_chunk(k=torch.ones(2, 2, 3, dtype=f16), v=torch.ones(2, 2, 3, dtype=f16)),
                                "k_pages"),
    "append/v shape": (with_chunk(v=torch.ones(2, 3, 3)), "v"),
    "append/v dtype": (with_chunk(v=torch.ones(2, 2, 3, dtype=f16)), "v"),
    "append/decisions float": (with_chunk(decisions=torch.zeros(2, 2)), "decisions"),
    "append/decisions shape": (with_chunk(decisions=zeros_b(2, 3)), "decisions"),
    "append/decisions strided": (with_chunk(decisions=strided(zeros_b(2, 2))), "decisions"),
    "append/valid shape": (with_chunk(valid=zeros_b(2, 1)), "valid"),
    "append/valid float": (with_chunk(valid=torch.ones(2, 2)), "valid"),
    # append: the store
    "append/k_pages rank": (with_state("k_pages", torch.zeros(8, 12)), "k_pages"),
    "append/k_pages strided": (with_state("k_pages", strided(torch.zeros(8, 4, 3))), "k_pages"),
    "append/page_size 0": (with_state("k_pages", torch.zeros(8, 0, 3)), "page_size"),
    "append/v_pages pool size": (with_state("v_pages", torch.zeros(7, 4, 3)), "v_pages"),
    "append/block_table int64": (with_state("block_table", torch.full((2, 4), -1)), "block_table"),
    "append/block_table batch": (with_state("block_table", torch.full((3, 4), -1, dtype=i32)), "block_table"),
    "append/seq_lens > capacity": (with_state("seq_lens", torch.tensor([3, 17], dtype=i32)), "seq_lens"),
    "append/seq_lens negative": (with_state("seq_lens", torch.tensor([-1, 3], dtype=i32)), "seq_lens"),
    "append/num_seen < seq_lens": (with_state("num_seen", torch.tensor([3, 2], dtype=i32)), "num_seen"),
    "append/num_seen shape": (with_state("num_seen", torch.zeros(2, 1, dtype=i32)), "num_seen"),
    "append/ring_slots window -1": (with_state("ring_slots", torch.zeros(2, 0, dtype=i32)), "ring_slots"),
    "append/ring_slots int64": (with_state("ring_slots", torch.zeros(2, 3, dtype=torch.int64)), "ring_slots"),
    "append/ring_flags width": (with_state("ring_flags", zeros_b(2, 4)), "ring_flags"),
    "append/ring_flags int": (with_state("ring_flags", torch.zeros(2, 3, dtype=i32)), "ring_flags"),
    "append/free_pages length": (with_state("free_pages", torch.arange(7, dtype=i32)), "free_pages"),
    "append/free_pages int64": (with_state("free_pages", torch.arange(8)), "free_pages"),
    "append/free_pages id >= P": (with_state("free_pages", torch.tensor([0, 1, 2, 3, 4, 99, 6, 7], dtype=i32)),
                                  "free_pages"),
    "append/free_pages id negative": (with_state("free_pages", torch.tensor([0, 1, 2, 3, 4, -5, 6, 7], dtype=i32)),
                                      "free_pages"),
    "append/free_top > P": (with_state("free_top", torch.tensor([9], dtype=i32)), "free_top"),
    "append/free_top negative": (with_state("free_top", torch.tensor([-1], dtype=i32)), "free_top"),
    "append/free_top shape": (with_state("free_top", torch.tensor([6, 6], dtype=i32)), "free_top"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_rejected_naming_the_argument(case):
    call, arg = BAD_INPUTS[case]
    with pytest.raises(RuntimeError, match=arg):
        call()


def _refused(mutate):
    """(state before, state after) of an append that must raise."""
    st = filled_store()
    mutate(st)
    before = {k: t.clone() for k, t in st.items()}
    with pytest.raises(RuntimeError) as err:
        append(st, k=torch.full((2, 2, 3), 5.0), decisions=torch.ones(2, 2, dtype=torch.bool))
    return before, st, str(err.value)


def assert_untouched(before, after):
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"a refused append modified {changed}"


@pytest.mark.parametrize("mutate", [
    lambda st: st["free_top"].fill_(0),  # pool exhausted
    lambda st: st.update(block_table=st["block_table"][:, :1].contiguous()),  # row too short
    lambda st: st["free_pages"].__setitem__(int(st["free_top"][0]) - 1, 8),  # next popped id out of range
])
def test_refused_append_writes_nothing(mutate):
    before, after, _ = _refused(mutate)
    assert_untouched(before, after)


# ---- corrupted cache state: checks the kernels lack (these tests fail until they are added) ----

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
    assert out.startswith("RAISED") and "num_seen" in out, out


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
    assert out.startswith("RAISED") and "ring_slots" in out, out


def test_append_rejects_negative_ring_slot_before_writing():
    """A negative ring slot reads block_table[s, slot / page_size] before the row (out of
    bounds) and is only caught after the ring was updated, with a message not naming ring_slots."""
    before, after, msg = _refused(lambda st: (st["ring_flags"].fill_(True), st["ring_slots"].fill_(-7)))
    assert "ring_slots" in msg, msg
    assert_untouched(before, after)


def test_append_rejects_bad_live_page_id_before_writing():
    """A live page of sequence 1 with id -1: caught only while writing, after sequence 0 was
    written (k_pages, seq_lens, num_seen, ring of sequence 0 changed)."""
    def mutate(st):
        st["block_table"][1, 0] = -1
    before, after, msg = _refused(mutate)
    assert "block_table" in msg, msg
    assert_untouched(before, after)


def test_append_rejects_duplicate_free_page_ids():
    """Two sequences popping the same page id share a page and overwrite each other's keys."""
    st = store()
    st["free_pages"].fill_(3)
    with pytest.raises(RuntimeError, match="free_pages"):
        append(st, T=1)


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_paged_decode_attention_rejects_non_finite_scale(scale):
    with pytest.raises(RuntimeError, match="scale"):
        attention(scale=scale)()
