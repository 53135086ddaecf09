// Block-sparse attention backward on CPU, FlashAttention-2 style (Dao 2023): probabilities are
// recomputed from the forward's out and log-sum-exp, never stored.
//
// block_sparse_backward: one task per (batch, kv head, key block). A task walks the *transposed*
//   Layout (for its key block, the query blocks that select it, per query head of the group) and for
//   each run of rows computes
//     S = scale q k^T (masked), P = exp(S - lse), dP = dout v^T, dS = P (dP - delta),
//     dV += P^T dout, dK += scale dS^T q, dQ += scale dS k,
//   where delta = rowsum(dout * out) - dlse (the lse cotangent; NaN taken as 0), computed in a parallel
//   pre-pass. dK / dV rows of a key block belong to one task, which zeroes them first, so no two threads
//   write them; dQ rows are shared between key blocks: the first worker accumulates into dQ itself, each
//   other worker into its own buffer (zeroed by that worker), added to dQ at the end. No output is
//   zero-filled serially: on large tensors that is a page-faulting pass as long as a small backward.
//   Tasks are handed out by an atomic counter, so a key block selected by every query (global tokens)
//   does not stall a static partition.
//   Consecutive query blocks of one key block are merged into one GEMM of up to kMaxRows rows (partial
//   tiles computed in full, their excluded pairs given probability 0).
//   BLAS runs single-threaded inside the parallel region (one level of parallelism).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "blocksparse_blas.h"

namespace {

using spattn_blas::abt;
using spattn_blas::add_pb;
using spattn_blas::add_ptb;
using spattn_blas::exp_nonpositive;

constexpr int64_t kMaxRows = 512;  // query rows per GEMM: consecutive whole query blocks merged up to this

struct Shape {
  int64_t batch, heads_q, heads_kv, group, nq, nk, d, dv;
  int64_t block_q, block_k, nqb, nkb, layout_batch, layout_heads;
  int64_t q_strides[3], k_strides[3], v_strides[3];
};

template <typename T>
struct Inputs {
  const T *q, *k, *v, *dout, *lse, *delta;
  const int64_t *ptr, *qblocks;
  const int32_t* mask_id;
  const uint8_t* masks;
  T scale;
};

template <typename T>
struct Scratch {
  std::vector<T> p, ds;
  Scratch(int64_t rows, int64_t cols) : p(rows * cols), ds(rows * cols) {}
};

// Query blocks [first, last] of head h (rows row0 = first * block_q onwards, m of them) against keys
// [key0, key0 + n) of kv head g (batch bi). Their tiles' mask ids are tile_masks[0 .. last - first]
// (-1 = whole tile): partial tiles are computed in full and their excluded pairs get probability 0, so a
// run of a key block's query blocks is one GEMM each way even where masks cut it.
template <typename T>
void run_grads(const Shape& s, const Inputs<T>& in, int64_t bi, int64_t h, int64_t g, int64_t first, int64_t m,
               int64_t key0, int64_t n, const int32_t* tile_masks, Scratch<T>& sc, T* dq, T* dk, T* dv) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t row0 = first * s.block_q;
  const T* qr = in.q + bi * s.q_strides[0] + h * s.q_strides[1] + row0 * s.q_strides[2];
  const T* kr = in.k + bi * s.k_strides[0] + g * s.k_strides[1] + key0 * s.k_strides[2];
  const T* vr = in.v + bi * s.v_strides[0] + g * s.v_strides[1] + key0 * s.v_strides[2];
  const int64_t row = (bi * s.heads_q + h) * s.nq + row0;
  const T* dor = in.dout + row * s.dv;
  const T* lse = in.lse + row;
  const T* delta = in.delta + row;
  T* p = sc.p.data();
  T* ds = sc.ds.data();

  abt<T>(m, n, s.d, in.scale, qr, s.q_strides[2], kr, s.k_strides[2], p);
  for (int64_t i = 0; i < m; ++i) {
    T* pi = p + i * n;
    const T l = lse[i];
    if (l == kNegInf) {  // a row without keys: no probability, no gradient
      std::fill(pi, pi + n, T(0));
      continue;
    }
    const int32_t u = tile_masks[i / s.block_q];
    if (u >= 0) {
      const uint8_t* mi = in.masks + (u * s.block_q + i % s.block_q) * s.block_k;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) pi[j] = mi[j] ? pi[j] : kNegInf;
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) pi[j] = exp_nonpositive(pi[j] - l);
  }
  abt<T>(m, n, s.dv, T(1), dor, s.dv, vr, s.v_strides[2], ds);
  for (int64_t i = 0; i < m; ++i) {
    const T di = delta[i];
    T* dsi = ds + i * n;
    const T* pi = p + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dsi[j] = pi[j] * (dsi[j] - di);
  }
  add_ptb<T>(m, n, s.dv, T(1), p, dor, s.dv, dv + key0 * s.dv, s.dv);
  add_ptb<T>(m, n, s.d, in.scale, ds, qr, s.q_strides[2], dk + key0 * s.d, s.d);
  add_pb<T>(m, n, s.d, in.scale, ds, kr, s.k_strides[2], dq + row * s.d, s.d);
}

// One task: every query row that selects key block kb of kv head g (batch bi), over the group's heads.
// dk / dv point at the (bi, g) head of the outputs; dq at the worker's accumulator.
template <typename T>
void key_block_grads(const Shape& s, const Inputs<T>& in, int64_t bi, int64_t g, int64_t kb, Scratch<T>& sc, T* dq,
                     T* dk, T* dv) {
  const int64_t key0 = kb * s.block_k, n = std::min(s.block_k, s.nk - key0);
  std::fill(dk + key0 * s.d, dk + (key0 + n) * s.d, T(0));
  std::fill(dv + key0 * s.dv, dv + (key0 + n) * s.dv, T(0));
  const int64_t lb = s.layout_batch == 1 ? 0 : bi;
  for (int64_t h = g * s.group; h < (g + 1) * s.group; ++h) {
    const int64_t lh = s.layout_heads == 1 ? 0 : h;
    const int64_t* row_ptr = in.ptr + (lb * s.layout_heads + lh) * (s.nkb + 1) + kb;
    const int64_t end = row_ptr[1];
    for (int64_t e = row_ptr[0]; e < end;) {
      // consecutive query blocks merged up to kMaxRows rows
      const int64_t first = in.qblocks[e];
      int64_t last = first, f = e + 1;
      while (f < end && in.qblocks[f] == last + 1 && (in.qblocks[f] + 1 - first) * s.block_q <= kMaxRows)
        last = in.qblocks[f++];
      const int64_t rows = std::min((last + 1) * s.block_q, s.nq) - first * s.block_q;
      run_grads<T>(s, in, bi, h, g, first, rows, key0, n, in.mask_id + e, sc, dq, dk, dv);
      e = f;
    }
  }
}

template <typename T>
T row_dot(const T* a, const T* b, int64_t n) {
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t c = 0; c < n; ++c) dot += a[c] * b[c];
  return dot;
}

template <typename T>
void add_into(T* dst, const T* src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

void check_tables(const Shape& s, const at::Tensor& ptr, const at::Tensor& qblocks, const at::Tensor& mask_id,
                  int64_t mask_count) {
  const int64_t entries = qblocks.size(0);
  const int64_t* pp = ptr.data_ptr<int64_t>();
  const int64_t* qp = qblocks.data_ptr<int64_t>();
  const int32_t* mp = mask_id.data_ptr<int32_t>();
  for (int64_t r = 0; r < s.layout_batch * s.layout_heads; ++r)
    for (int64_t kb = 0; kb < s.nkb; ++kb) {
      const int64_t begin = pp[r * (s.nkb + 1) + kb], end = pp[r * (s.nkb + 1) + kb + 1];
      TORCH_CHECK(0 <= begin && begin <= end && end <= entries, "block_sparse_backward: q_ptr entries must be ",
                  "non-decreasing offsets into q_blocks, got [", begin, ", ", end, ") of ", entries);
      for (int64_t e = begin; e < end; ++e) {
        TORCH_CHECK(0 <= qp[e] && qp[e] < s.nqb && (e == begin || qp[e] > qp[e - 1]),
                    "block_sparse_backward: q_blocks of a key block must be increasing query blocks in [0, ", s.nqb,
                    "), got ", qp[e]);
        TORCH_CHECK(-1 <= mp[e] && mp[e] < mask_count, "block_sparse_backward: q_mask_id must lie in [-1, ",
                    mask_count, "), got ", mp[e]);
      }
    }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& dlse, const at::Tensor& q_ptr, const at::Tensor& q_blocks,
    const at::Tensor& q_mask_id, const at::Tensor& masks, int64_t block_q, int64_t block_k, double scale) {
  TORCH_CHECK(spattn_blas::available(), "block_sparse_backward: this torch build exports no sgemm_ / dgemm_");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && dout.dim() == 4,
              "block_sparse_backward: q, k, v, dout must be [B, H, N, D]");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "block_sparse_backward: float32 or float64 only, got ",
              dtype);
  for (const at::Tensor* t : {&k, &v, &dout, &out, &lse, &dlse})
    TORCH_CHECK(t->scalar_type() == dtype, "block_sparse_backward: q, k, v, dout, out, lse, dlse must share a dtype");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "block_sparse_backward: q, k, v need a unit stride in the last dim");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == v.size(1) && k.size(2) == v.size(2) &&
                  k.size(3) == q.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "block_sparse_backward: shapes q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], Hq % Hkv == 0");
  TORCH_CHECK(dout.is_contiguous() && out.is_contiguous() && lse.is_contiguous() && dlse.is_contiguous(),
              "block_sparse_backward: dout, out, lse, dlse must be contiguous");
  TORCH_CHECK(dout.size(0) == q.size(0) && dout.size(1) == q.size(1) && dout.size(2) == q.size(2) &&
                  dout.size(3) == v.size(3) && out.sizes() == dout.sizes() && lse.dim() == 3 &&
                  lse.sizes() == dout.sizes().slice(0, 3) && (dlse.numel() == 0 || dlse.sizes() == lse.sizes()),
              "block_sparse_backward: dout and out [B, Hq, Nq, Dv], lse [B, Hq, Nq], dlse like lse or empty");
  TORCH_CHECK(block_q >= 1 && block_k >= 1, "block_sparse_backward: block sizes must be >= 1");
  TORCH_CHECK(q_ptr.scalar_type() == at::kLong && q_blocks.scalar_type() == at::kLong &&
                  q_mask_id.scalar_type() == at::kInt && masks.scalar_type() == at::kBool,
              "block_sparse_backward: q_ptr / q_blocks int64, q_mask_id int32, masks bool");
  TORCH_CHECK(q_ptr.is_contiguous() && q_blocks.is_contiguous() && q_mask_id.is_contiguous() && masks.is_contiguous(),
              "block_sparse_backward: layout tensors must be contiguous");
  TORCH_CHECK(q_ptr.dim() == 3 && q_blocks.dim() == 1 && q_mask_id.sizes() == q_blocks.sizes(),
              "block_sparse_backward: q_ptr [B', H', NKB + 1], q_blocks and q_mask_id [E]");
  TORCH_CHECK(masks.dim() == 3 && masks.size(1) == block_q && masks.size(2) == block_k,
              "block_sparse_backward: masks must be [U, block_q, block_k]");

  Shape s{};
  s.batch = q.size(0), s.heads_q = q.size(1), s.heads_kv = k.size(1), s.group = s.heads_q / s.heads_kv;
  s.nq = q.size(2), s.nk = k.size(2), s.d = q.size(3), s.dv = v.size(3);
  s.block_q = block_q, s.block_k = block_k;
  s.nqb = (s.nq + block_q - 1) / block_q, s.nkb = (s.nk + block_k - 1) / block_k;
  s.layout_batch = q_ptr.size(0), s.layout_heads = q_ptr.size(1);
  TORCH_CHECK(q_ptr.size(2) == s.nkb + 1, "block_sparse_backward: q_ptr has ", q_ptr.size(2) - 1,
              " key blocks, expected ", s.nkb);
  TORCH_CHECK((s.layout_batch == 1 || s.layout_batch == s.batch) && (s.layout_heads == 1 || s.layout_heads == s.heads_q),
              "block_sparse_backward: layout batch / heads must be 1 or those of q");
  for (int i = 0; i < 3; ++i) s.q_strides[i] = q.stride(i), s.k_strides[i] = k.stride(i), s.v_strides[i] = v.stride(i);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();  // BLAS takes int sizes and leading dimensions
  TORCH_CHECK(s.q_strides[2] <= kIntMax && s.k_strides[2] <= kIntMax && s.v_strides[2] <= kIntMax,
              "block_sparse_backward: row strides of q, k, v must fit a BLAS int");
  check_tables(s, q_ptr, q_blocks, q_mask_id, masks.size(0));

  const int64_t workers = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows = s.batch * s.heads_q * s.nq, dq_size = rows * s.d;
  auto dq = at::empty({s.batch, s.heads_q, s.nq, s.d}, q.options());
  auto dq_more = at::empty({workers - 1, s.batch, s.heads_q, s.nq, s.d}, q.options());  // workers 1, 2, ...
  auto dk = at::empty({s.batch, s.heads_kv, s.nk, s.d}, q.options());
  auto dv = at::empty({s.batch, s.heads_kv, s.nk, s.dv}, q.options());
  auto delta = at::empty({s.batch, s.heads_q, s.nq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "block_sparse_backward", [&] {
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    scalar_t* dq_morep = dq_more.data_ptr<scalar_t>();
    scalar_t* deltap = delta.data_ptr<scalar_t>();
    const scalar_t* dop = dout.data_ptr<scalar_t>();
    const scalar_t* outp = out.data_ptr<scalar_t>();
    const scalar_t* dlsep = dlse.numel() ? dlse.data_ptr<scalar_t>() : nullptr;
    // pre-pass: delta = rowsum(dout * out) - dlse, dq = 0
    at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t dot = row_dot(dop + r * s.dv, outp + r * s.dv, s.dv);
        const scalar_t dl = dlsep == nullptr || dlsep[r] != dlsep[r] ? scalar_t(0) : dlsep[r];
        deltap[r] = dot - dl;
      }
      std::fill(dqp + r0 * s.d, dqp + r1 * s.d, scalar_t(0));
    });
    const uint8_t* mk = reinterpret_cast<const uint8_t*>(masks.data_ptr<bool>());
    const Inputs<scalar_t> in{q.data_ptr<scalar_t>(),     k.data_ptr<scalar_t>(),   v.data_ptr<scalar_t>(),
                              dop,                        lse.data_ptr<scalar_t>(), deltap,
                              q_ptr.data_ptr<int64_t>(),  q_blocks.data_ptr<int64_t>(),
                              q_mask_id.data_ptr<int32_t>(), mk, static_cast<scalar_t>(scale)};
    scalar_t* dkp = dk.data_ptr<scalar_t>();
    scalar_t* dvp = dv.data_ptr<scalar_t>();
    const int64_t tasks = s.batch * s.heads_kv * s.nkb;
    std::atomic<int64_t> next{0};
    // one chunk per worker; chunk 0 accumulates into dq, chunk w > 0 into dq_more[w - 1]
    at::parallel_for(0, workers, 1, [&](int64_t worker, int64_t end) {
      const spattn_blas::OneBlasThread one_blas_thread;
      Scratch<scalar_t> sc(std::max(kMaxRows, block_q), block_k);
      scalar_t* dqw = worker == 0 ? dqp : dq_morep + (worker - 1) * dq_size;
      // zero every extra buffer of this chunk (a chunk spans several workers when the loop runs
      // serially, e.g. inside another parallel region): the final sum reads them all
      for (int64_t w = std::max<int64_t>(worker, 1); w < end; ++w)
        std::fill(dq_morep + (w - 1) * dq_size, dq_morep + w * dq_size, scalar_t(0));
      for (int64_t t = next++; t < tasks; t = next++) {
        const int64_t kb = t % s.nkb, g = (t / s.nkb) % s.heads_kv, bi = t / (s.nkb * s.heads_kv);
        const int64_t head = bi * s.heads_kv + g;
        key_block_grads<scalar_t>(s, in, bi, g, kb, sc, dqw, dkp + head * s.nk * s.d, dvp + head * s.nk * s.dv);
      }
    });
    if (workers > 1)
      at::parallel_for(0, dq_size, 1 << 14, [&](int64_t i0, int64_t i1) {
        for (int64_t w = 0; w + 1 < workers; ++w) add_into(dqp + i0, dq_morep + w * dq_size + i0, i1 - i0);
      });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spattn_cpu, m) {
  m.def("block_sparse_backward(Tensor q, Tensor k, Tensor v, Tensor dout, Tensor out, Tensor lse, Tensor dlse, "
        "Tensor q_ptr, Tensor q_blocks, Tensor q_mask_id, Tensor masks, int block_q, int block_k, float scale) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(spattn_cpu, CPU, m) { m.impl("block_sparse_backward", &block_sparse_backward); }
