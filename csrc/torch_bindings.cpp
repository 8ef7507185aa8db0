// The one place every dms operator schema is defined (TORCH_LIBRARY may appear in one
// shared library only, see docs/building.md #6). Kernels register with TORCH_LIBRARY_IMPL in
// csrc/cpu and csrc/cuda; fake kernels live in dms/_ops.py.
//
// Layout (docs/design.md §2): sequence s = b * H_kv + h. Per layer:
//   k_pages, v_pages  [P, page_size, D]  model dtype
//   block_table       int32 [S, max_pages], -1 = no page
//   seq_lens          int32 [S]  live slots (slots 0..seq_lens[s]-1 are all live)
//   num_seen          int32 [S]  valid tokens appended so far
//   ring_slots        int32 [S, w+1]  slot of token n sits at column n % (w+1)
//   ring_flags        bool  [S, w+1]  eviction flag of that token (newest: false)
//   free_pages        int32 [P]  free page ids are free_pages[0 .. free_top)
//   free_top          int32 [1]
#include <torch/library.h>

TORCH_LIBRARY(dms, m) {
  // Eviction flags of whole sequences (empty cache). decisions bool [S, T]; valid bool [S, T]
  // or None. flag of a valid token = decision of the next valid token; a valid token is kept
  // iff it is among the last window+1 valid tokens or its flag is 0.
  // keep bool [S, T]; offsets int32 [S, T] = kept tokens before t in s; counts int32 [S].
  m.def("scan_flags(Tensor decisions, Tensor? valid, int window) -> (Tensor keep, Tensor offsets, Tensor counts)");

  // Dense [S, T, D] + keep bool [S, T] -> packed [N, D] (stable order: s, then t),
  // cu_seqlens int32 [S+1], max_seqlen. max_seqlen is a SymInt (a plain int in eager) so the
  // fake kernel can return it unbacked: with `int`, torch.compile and opcheck must specialise it.
  m.def("compact(Tensor x, Tensor keep) -> (Tensor packed, Tensor cu_seqlens, SymInt max_seqlen)");

  // Feed T new tokens (T = 0 is a no-op) per sequence (k, v [S, T, D], decisions bool [S, T], valid bool
  // [S, T] or None) into the paged store, one token at a time per sequence: the decision of
  // token n flags token n-1; token n-w-1 leaves the window and, if flagged, its slot is taken
  // by token n; otherwise token n takes slot seq_lens[s] (popping a page when it starts one).
  // Pages are popped from the top of the free list in sequence order (deterministic). If the
  // pool or a block_table row is too small, nothing is written: CPU raises; CUDA, which cannot
  // raise without a host sync, leaves the state untouched and sets free_top to -(pages needed).
  // A corrupt state is refused the same way before anything is written (CPU raises; CUDA sets
  // free_top to INT32_MIN): seq_lens outside [0, max_pages * page_size], a live page id outside
  // [0, P), num_seen < seq_lens or num_seen + T past int32, a ring slot handed over that is not
  // in [0, seq_lens), free_top outside [0, P], a popped free page id outside [0, P); duplicate
  // popped ids are refused on CPU only.
  m.def(
      "append(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) block_table, Tensor(d!) seq_lens, "
      "Tensor(e!) num_seen, Tensor(f!) ring_slots, Tensor(g!) ring_flags, Tensor free_pages, "
      "Tensor(h!) free_top, Tensor k, Tensor v, Tensor decisions, Tensor? valid) -> ()");

  // q [S, G, D] attends every live slot of sequence s; fp32 softmax; out [S, G, D] in q's
  // dtype; an empty sequence gives zeros. scale must be finite in fp32.
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, "
      "Tensor seq_lens, float scale) -> Tensor");

  // Paged store -> packed varlen [N, D] in slot order, cu_seqlens int32 [S+1], max_seqlen.
  m.def("gather_varlen(Tensor pages, Tensor block_table, Tensor seq_lens) -> (Tensor packed, Tensor cu_seqlens, SymInt max_seqlen)");
}
