// Block-sparse attention forward on CPU, for inference (no autograd state is kept).
//
// block_sparse_forward: every query block of every head attends to the key blocks a Layout lists,
//   FlashAttention-style (Dao et al. 2022): scores of one run of keys, running row max and sum, output
//   rescaled as the max grows. Keys and values are read in place from the caller's tensors (no gathered
//   copies). Consecutive whole ("full") blocks are merged into one run (one GEMM each way), and runs are
//   grouped into chunks of up to kMaxRun keys whose scores sit side by side, so the softmax step works
//   on long rows even when the selected blocks are scattered. Partial blocks are masked with the
//   precomputed per-tile masks, in slices of rows that skip the columns none of their rows may see.
//
// GEMMs go to the BLAS that libtorch_cpu exports (sgemm_ / dgemm_, MKL on x86 builds). They are weak
// symbols: without them the library still loads, block_sparse_blas() says false and spattn keeps
// its eager kernel. MKL_Set_Num_Threads_Local (weak too; absent with other BLAS) keeps that BLAS on
// one thread inside the parallel loop.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "blocksparse_blas.h"
#include "blocksparse_tiles.h"

namespace {

constexpr int64_t kMaxRun = 512;  // keys per score chunk; consecutive full blocks are merged up to this

using spattn_blas::exp_nonpositive;
using spattn_tiles::for_each_slice;
using spattn_tiles::kMaskRows;
using spattn_tiles::MaskExtents;

bool have_blas() { return spattn_blas::available(); }

// Row-major s[i, j] = alpha * q[i, :] . k[j, :] for i < m, j < n (s has leading dimension lds).
template <typename T>
void scores(int64_t m, int64_t n, int64_t d, T alpha, const T* q, int64_t ldq, const T* k, int64_t ldk, T* s,
            int64_t lds) {
  spattn_blas::abt<T>(m, n, d, alpha, q, ldq, k, ldk, s, lds);
}

// Row-major o[i, :] += p[i, :n] . v[:n, :] for i < m (o has leading dimension dv, p has ldp).
template <typename T>
void accumulate(int64_t m, int64_t n, int64_t dv, const T* p, const T* v, int64_t ldv, T* o, int64_t ldp) {
  spattn_blas::add_pb<T>(m, n, dv, T(1), p, v, ldv, o, dv, ldp);
}

// One row of scores -> probabilities relative to the updated running max; returns the factor the
// row's earlier output and sum must be multiplied by. A row with no key yet stays all zero.
template <typename T>
T softmax_step(T* s, int64_t n, T& row_max, T& row_sum) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  T mx = kNegInf;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;  // NaN scores are skipped here ...
  const T new_max = mx > row_max ? mx : row_max;
  if (new_max == kNegInf) {
    // no key in the row yet; a NaN score (NaN query or key) makes the row NaN, as in the dense reference
    const bool nan = std::any_of(s, s + n, [](T x) { return x != x; });
    std::fill(s, s + n, nan ? std::numeric_limits<T>::quiet_NaN() : T(0));
    if (nan) row_max = row_sum = std::numeric_limits<T>::quiet_NaN();
    return nan ? row_max : T(1);
  }
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const T e = exp_nonpositive(s[j] - new_max);  // ... but exp(NaN) is NaN: the row sum and output turn NaN
    s[j] = e;
    sum += e;
  }
  const T factor = exp_nonpositive(row_max - new_max);  // row_max = -inf: 0
  row_sum = row_sum * factor + sum;
  row_max = new_max;
  return factor;
}

struct Problem {
  int64_t batch, heads_q, heads_kv, nq, nk, d, dv;
  int64_t block_q, block_k, layout_batch, layout_heads, nqb, slots;
  int64_t q_strides[3], k_strides[3], v_strides[3];
};

// A run of keys inside one chunk of the score buffer: keys [key0, key0 + n) at columns [col, col + n);
// mask = -1 for whole blocks (merged), else the partial tile's mask id.
struct Segment {
  int64_t key0, n, col;
  int32_t mask;
};

// Running state of one query block's online softmax. Scores of up to `width` keys (a chunk of several
// runs) are kept side by side, so the softmax and the output rescale run once per chunk, over rows of
// up to `width` keys, not once per 64-key block.
template <typename T>
struct BlockState {
  int64_t width;
  std::vector<T> scores, out, row_max, row_sum;
  std::vector<Segment> segments;
  BlockState(int64_t rows, int64_t width, int64_t dv)
      : width(width), scores(rows * width), out(rows * dv), row_max(rows), row_sum(rows) {}
};

// One (batch, query head, query block): online softmax over the block's keys, a chunk at a time. A
// chunk is consecutive runs (whole blocks merged, or one partial tile) of at most st.width keys in
// all: their scores are computed into adjacent columns, then one softmax step and one output update
// per run. Partial tiles are computed in slices of rows, each over the columns its masks reach, and
// the rest of the tile's columns are set to -inf.
template <typename T>
void attend_query_block(const Problem& p, int64_t bi, int64_t h, int64_t qb, const T* q, const T* k, const T* v,
                        const int64_t* num, const int64_t* idx, const int32_t* mask_id, const uint8_t* masks,
                        const MaskExtents& extents, T scale, T* out, T* lse, BlockState<T>& st) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t g = h / (p.heads_q / p.heads_kv);
  const int64_t row0 = qb * p.block_q, m = std::min(p.block_q, p.nq - row0);
  const T* qt = q + bi * p.q_strides[0] + h * p.q_strides[1] + row0 * p.q_strides[2];
  const T* kh = k + bi * p.k_strides[0] + g * p.k_strides[1];
  const T* vh = v + bi * p.v_strides[0] + g * p.v_strides[1];
  const int64_t ldq = p.q_strides[2], ldk = p.k_strides[2], ldv = p.v_strides[2], width = st.width;
  const int64_t lb = p.layout_batch == 1 ? 0 : bi, lh = p.layout_heads == 1 ? 0 : h;
  const int64_t tile = (lb * p.layout_heads + lh) * p.nqb + qb;
  const int64_t count = num[tile];
  const int64_t* blocks = idx + tile * p.slots;
  const int32_t* ids = mask_id + tile * p.slots;
  T* sc = st.scores.data();
  T* o = st.out.data();

  std::fill(st.out.begin(), st.out.begin() + m * p.dv, T(0));
  std::fill(st.row_max.begin(), st.row_max.begin() + m, kNegInf);
  std::fill(st.row_sum.begin(), st.row_sum.begin() + m, T(0));

  for (int64_t s = 0; s < count;) {
    // the chunk's runs
    auto& segs = st.segments;
    segs.clear();
    int64_t cols = 0;
    while (s < count) {
      const int64_t first = blocks[s], key0 = first * p.block_k;
      int64_t n, next;
      if (ids[s] >= 0) {
        n = std::min(p.block_k, p.nk - key0), next = s + 1;
      } else {  // whole tiles: consecutive blocks merged up to kMaxRun keys
        int64_t last = first;
        next = s + 1;
        while (next < count && ids[next] < 0 && blocks[next] == last + 1 &&
               (blocks[next] + 1 - first) * p.block_k <= kMaxRun)
          last = blocks[next++];
        n = std::min((last + 1) * p.block_k, p.nk) - key0;
      }
      if (cols > 0 && cols + n > width) break;
      segs.push_back({key0, n, cols, ids[s]});
      cols += n;
      s = next;
    }
    // scores
    for (const Segment& seg : segs) {
      T* sseg = sc + seg.col;
      if (seg.mask < 0) {
        scores<T>(m, seg.n, p.d, scale, qt, ldq, kh + seg.key0 * ldk, ldk, sseg, width);
        continue;
      }
      const uint8_t* mask = masks + seg.mask * p.block_q * p.block_k;
      for_each_slice(extents, seg.mask, p.block_q, m, seg.n, [&](int64_t i0, int64_t rows, int64_t c0, int64_t c1) {
        if (c1 > c0)
          scores<T>(rows, c1 - c0, p.d, scale, qt + i0 * ldq, ldq, kh + (seg.key0 + c0) * ldk, ldk,
                    sseg + i0 * width + c0, width);
        for (int64_t i = i0; i < i0 + rows; ++i) {
          T* si = sseg + i * width;
          const uint8_t* mi = mask + i * p.block_k;
          for (int64_t j = 0; j < seg.n; ++j)
            if (j < c0 || j >= c1 || !mi[j]) si[j] = kNegInf;
        }
      });
    }
    // softmax step and rescale of the output so far
    for (int64_t i = 0; i < m; ++i) {
      const T factor = softmax_step<T>(sc + i * width, cols, st.row_max[i], st.row_sum[i]);
      if (factor != T(1)) {
        T* oi = o + i * p.dv;
#pragma omp simd
        for (int64_t c = 0; c < p.dv; ++c) oi[c] *= factor;
      }
    }
    // output update
    for (const Segment& seg : segs) {
      const T* pseg = sc + seg.col;
      if (seg.mask < 0) {
        accumulate<T>(m, seg.n, p.dv, pseg, vh + seg.key0 * ldv, ldv, o, width);
        continue;
      }
      for_each_slice(extents, seg.mask, p.block_q, m, seg.n, [&](int64_t i0, int64_t rows, int64_t c0, int64_t c1) {
        if (c1 > c0)
          accumulate<T>(rows, c1 - c0, p.dv, pseg + i0 * width + c0, vh + (seg.key0 + c0) * ldv, ldv,
                        o + i0 * p.dv, width);
      });
    }
  }

  T* ot = out + ((bi * p.heads_q + h) * p.nq + row0) * p.dv;
  T* lt = lse + (bi * p.heads_q + h) * p.nq + row0;
  for (int64_t i = 0; i < m; ++i) {
    const bool empty = st.row_sum[i] == T(0);
    const T inv = empty ? T(0) : T(1) / st.row_sum[i];
    const T* oi = o + i * p.dv;
#pragma omp simd
    for (int64_t c = 0; c < p.dv; ++c) ot[i * p.dv + c] = oi[c] * inv;
    lt[i] = empty ? kNegInf : st.row_max[i] + std::log(st.row_sum[i]);
  }
}

// Every count, block index and mask id the loop will read must point inside its tensors: a Layout's
// tables are ordinary (mutable) tensors, so they are checked here, once per call, before any thread
// starts (one pass over B' x H' x NQB x S integers, negligible next to the attention itself).
void check_tables(const at::Tensor& kv_num, const at::Tensor& kv_idx, const at::Tensor& mask_id, int64_t nkb,
                  int64_t num_masks) {
  const int64_t tiles = kv_num.numel(), slots = kv_idx.size(3);
  const int64_t* num = kv_num.data_ptr<int64_t>();
  const int64_t* idx = kv_idx.data_ptr<int64_t>();
  const int32_t* ids = mask_id.data_ptr<int32_t>();
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t count = num[t];
    TORCH_CHECK(count >= 0 && count <= slots, "block_sparse_forward: kv_num_blocks must lie in [0, ", slots,
                "] (slots of kv_indices), got ", count, " at flat query block ", t);
    for (int64_t s = 0; s < count; ++s) {
      const int64_t kb = idx[t * slots + s];
      TORCH_CHECK(kb >= 0 && kb < nkb, "block_sparse_forward: kv_indices must lie in [0, ", nkb,
                  ") (key blocks), got ", kb, " at flat query block ", t, ", slot ", s);
      const int32_t u = ids[t * slots + s];
      TORCH_CHECK(u >= -1 && u < num_masks, "block_sparse_forward: mask_id must lie in [-1, ", num_masks,
                  ") (partial-tile masks), got ", u, " at flat query block ", t, ", slot ", s);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> block_sparse_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& kv_num, const at::Tensor& kv_idx,
                                                        const at::Tensor& mask_id, const at::Tensor& masks,
                                                        int64_t block_q, int64_t block_k, double scale) {
  TORCH_CHECK(have_blas(), "block_sparse_forward: this torch build exports no sgemm_ / dgemm_");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "block_sparse_forward: q, k, v must be [B, H, N, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "block_sparse_forward: q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "block_sparse_forward: float32 or float64 only, got ", q.scalar_type());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "block_sparse_forward: q, k, v need a unit stride in the last dim");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == v.size(1) && k.size(2) == v.size(2) &&
                  k.size(3) == q.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "block_sparse_forward: shapes q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], Hq % Hkv == 0");
  TORCH_CHECK(kv_num.scalar_type() == at::kLong && kv_idx.scalar_type() == at::kLong &&
                  mask_id.scalar_type() == at::kInt && masks.scalar_type() == at::kBool,
              "block_sparse_forward: kv_num / kv_idx int64, mask_id int32, masks bool");
  TORCH_CHECK(kv_num.is_contiguous() && kv_idx.is_contiguous() && mask_id.is_contiguous() && masks.is_contiguous(),
              "block_sparse_forward: layout tensors must be contiguous");
  TORCH_CHECK(kv_idx.dim() == 4 && kv_num.dim() == 3 && mask_id.sizes() == kv_idx.sizes() &&
                  kv_idx.sizes().slice(0, 3) == kv_num.sizes(),
              "block_sparse_forward: kv_num [B', H', NQB], kv_idx and mask_id [B', H', NQB, S]");
  TORCH_CHECK(block_q >= 1 && block_k >= 1, "block_sparse_forward: block_q and block_k must be >= 1, got ", block_q,
              ", ", block_k);
  TORCH_CHECK(masks.dim() == 3 && masks.size(1) == block_q && masks.size(2) == block_k,
              "block_sparse_forward: masks must be [U, block_q, block_k]");

  Problem p{};
  p.batch = q.size(0), p.heads_q = q.size(1), p.heads_kv = k.size(1), p.nq = q.size(2), p.nk = k.size(2);
  p.d = q.size(3), p.dv = v.size(3), p.block_q = block_q, p.block_k = block_k;
  p.layout_batch = kv_num.size(0), p.layout_heads = kv_num.size(1), p.nqb = kv_num.size(2), p.slots = kv_idx.size(3);
  TORCH_CHECK(p.nqb == (p.nq + block_q - 1) / block_q, "block_sparse_forward: kv_num has ", p.nqb,
              " query blocks, expected ", (p.nq + block_q - 1) / block_q);
  TORCH_CHECK((p.layout_batch == 1 || p.layout_batch == p.batch) && (p.layout_heads == 1 || p.layout_heads == p.heads_q),
              "block_sparse_forward: layout batch / heads must be 1 or those of q");
  for (int i = 0; i < 3; ++i) p.q_strides[i] = q.stride(i), p.k_strides[i] = k.stride(i), p.v_strides[i] = v.stride(i);
  check_tables(kv_num, kv_idx, mask_id, (p.nk + block_k - 1) / block_k, masks.size(0));
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();  // BLAS takes int leading dimensions
  TORCH_CHECK(p.q_strides[2] <= kIntMax && p.k_strides[2] <= kIntMax && p.v_strides[2] <= kIntMax,
              "block_sparse_forward: row strides of q, k, v must fit a BLAS int");

  auto out = at::empty({p.batch, p.heads_q, p.nq, p.dv}, q.options());
  auto lse = at::empty({p.batch, p.heads_q, p.nq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "block_sparse_forward", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const int64_t* np = kv_num.data_ptr<int64_t>();
    const int64_t* ip = kv_idx.data_ptr<int64_t>();
    const int32_t* mp = mask_id.data_ptr<int32_t>();
    const uint8_t* mk = reinterpret_cast<const uint8_t*>(masks.data_ptr<bool>());
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* lp = lse.data_ptr<scalar_t>();
    const scalar_t sc = static_cast<scalar_t>(scale);
    const MaskExtents extents(mk, masks.size(0), block_q, block_k);
    // One level of parallelism: the (batch, head, query block) tiles run on torch's threads, and the
    // BLAS inside each is forced to one thread. Called inside an OpenMP region, MKL's sgemm otherwise
    // still takes its threaded path: profiled at 2 threads, over 60 % of the time went to libgomp
    // barrier waits and sched_yield, 5-20x slower than 1 thread on a loaded machine. Tiles are handed
    // out dynamically, the heaviest (last query blocks of causal layouts) first, so a thread that is
    // descheduled or given denser heads does not hold the others back at the final barrier.
    const int64_t total = p.batch * p.heads_q * p.nqb, rows_of_tiles = p.batch * p.heads_q;
    const int64_t workers = std::min<int64_t>(at::get_num_threads(), total);
    std::atomic<int64_t> next{0};
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      const spattn_blas::OneBlasThread one_blas_thread;
      BlockState<scalar_t> state(block_q, std::max(kMaxRun, block_k), p.dv);
      for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < total;) {
        const int64_t qb = p.nqb - 1 - t / rows_of_tiles, h = t % p.heads_q, bi = (t % rows_of_tiles) / p.heads_q;
        attend_query_block<scalar_t>(p, bi, h, qb, qp, kp, vp, np, ip, mp, mk, extents, sc, op, lp, state);
      }
    });
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spattn_cpu, m) {
  m.def("block_sparse_forward(Tensor q, Tensor k, Tensor v, Tensor kv_num, Tensor kv_idx, Tensor mask_id, "
        "Tensor masks, int block_q, int block_k, float scale) -> (Tensor, Tensor)");
  m.def("block_sparse_blas() -> bool", &have_blas);
}

TORCH_LIBRARY_IMPL(spattn_cpu, CPU, m) { m.impl("block_sparse_forward", &block_sparse_forward); }
