// Fused CPU kernels for decoding with key sets shared by a grouped-query-attention group.
//
// group_topk: Double Sparsity (Yang et al. 2024) selection with one token set per kv head: the
//   approximate score of token t for query head h is q_h[channels] . labels[:, t]; the group keeps the
//   `count` tokens with the largest max-over-heads score. Labels are channel-major ([r, N] per kv head)
//   so the score loop runs along tokens.
// shared_rows_attention: one query per head attends to the selected rows of its kv head; the query
//   heads of a group read each selected key / value row once (Quest group pages, grouped Double Sparsity).
//
// Both parallelise over (batch, kv head) and allocate nothing of size N x N.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kTokenBlock = 256;

template <typename T>
void group_scores(const T* q, int64_t q_head_stride, int64_t group, const int64_t* channels, int64_t r,
                  const T* labels, int64_t channel_stride, int64_t n, T* scores) {
  std::vector<T> acc(group * kTokenBlock);
  for (int64_t t0 = 0; t0 < n; t0 += kTokenBlock) {
    const int64_t len = std::min(kTokenBlock, n - t0);
    std::fill(acc.begin(), acc.end(), T(0));
    for (int64_t c = 0; c < r; ++c) {
      const T* row = labels + c * channel_stride + t0;
      for (int64_t h = 0; h < group; ++h) {
        const T w = q[h * q_head_stride + channels[c]];
        T* a = acc.data() + h * kTokenBlock;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) a[i] += w * row[i];
      }
    }
    for (int64_t i = 0; i < len; ++i) {
      T best = acc[i];
      for (int64_t h = 1; h < group; ++h) best = std::max(best, acc[h * kTokenBlock + i]);
      scores[t0 + i] = best;
    }
  }
}

// Order-preserving unsigned keys of floating-point scores (NaN sorts lowest).
inline uint32_t sort_key(float x) {
  if (std::isnan(x)) return 0;
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline uint64_t sort_key(double x) {
  if (std::isnan(x)) return 0;
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// The `count` largest of scores[0..n) (ties at the boundary: the earliest positions), written to out
// in ascending order. Most-significant-digit radix select on order-preserving keys, 11 bits per pass:
// the first pass histograms every score, later ones only the boundary bin's candidates.
template <typename T>
void top_positions(const T* scores, int64_t n, int64_t count, int64_t* out) {
  using Key = decltype(sort_key(T(0)));
  constexpr int kBits = 11, kBins = 1 << kBits, kKeyBits = 8 * sizeof(Key);
  int shift = kKeyBits - kBits;
  std::vector<Key> keys(n);
  std::vector<int64_t> hist(kBins, 0);
  for (int64_t t = 0; t < n; ++t) {
    keys[t] = sort_key(scores[t]);
    ++hist[keys[t] >> shift];
  }
  std::vector<uint8_t> keep(n, 0);
  std::vector<int64_t> cand, next;
  int64_t need = count;
  bool first = true;
  while (true) {
    int64_t above = 0, bin = kBins - 1;
    for (; bin > 0 && above + hist[bin] < need; --bin) above += hist[bin];
    next.clear();
    auto split = [&](int64_t t) {
      const int64_t d = static_cast<int64_t>((keys[t] >> shift) & (kBins - 1));
      if (d > bin) keep[t] = 1;
      else if (d == bin) next.push_back(t);
    };
    if (first) {
      for (int64_t t = 0; t < n; ++t) split(t);
    } else {
      for (int64_t t : cand) split(t);
    }
    first = false;
    need -= above;
    cand.swap(next);  // ascending positions
    if (static_cast<int64_t>(cand.size()) <= need || shift == 0) {  // all fit, or identical keys
      for (int64_t j = 0; j < need && j < static_cast<int64_t>(cand.size()); ++j) keep[cand[j]] = 1;
      break;
    }
    shift = shift >= kBits ? shift - kBits : 0;
    std::fill(hist.begin(), hist.end(), 0);
    for (int64_t t : cand) ++hist[(keys[t] >> shift) & (kBins - 1)];
  }
  int64_t m = 0;
  for (int64_t t = 0; t < n && m < count; ++t)
    if (keep[t]) out[m++] = t;
}

at::Tensor group_topk(const at::Tensor& q, const at::Tensor& labels, const at::Tensor& channels, int64_t count) {
  // q [B, Hq, D]; labels [B, Hkv, r, N] (channel-major, unit stride along N); channels [Hkv, r] int64
  TORCH_CHECK(q.dim() == 3 && labels.dim() == 4 && channels.dim() == 2, "group_topk: bad ranks");
  TORCH_CHECK(labels.stride(3) == 1, "group_topk: labels must have unit stride along tokens");
  TORCH_CHECK(q.stride(2) == 1, "group_topk: q must have unit stride along channels");
  TORCH_CHECK(channels.scalar_type() == at::kLong && channels.is_contiguous(), "group_topk: channels int64");
  TORCH_CHECK(q.scalar_type() == labels.scalar_type(), "group_topk: dtype mismatch");
  const int64_t b = q.size(0), hq = q.size(1), hkv = labels.size(1), r = labels.size(2), n = labels.size(3);
  TORCH_CHECK(hq % hkv == 0 && channels.size(0) == hkv && channels.size(1) == r, "group_topk: shape mismatch");
  TORCH_CHECK(count >= 1 && count <= n, "group_topk: count out of range");
  const int64_t group = hq / hkv;
  auto out = at::empty({b, hkv, count}, q.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "group_topk", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* lp = labels.data_ptr<scalar_t>();
    const int64_t* cp = channels.data_ptr<int64_t>();
    int64_t* op = out.data_ptr<int64_t>();
    at::parallel_for(0, b * hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scores(n);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bi = i / hkv, g = i % hkv;
        group_scores(qp + bi * q.stride(0) + g * group * q.stride(1), q.stride(1), group, cp + g * r, r,
                     lp + bi * labels.stride(0) + g * labels.stride(1), labels.stride(2), n, scores.data());
        top_positions(scores.data(), n, count, op + i * count);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> shared_rows_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const at::Tensor& rows, double scale) {
  // q [B, Hq, D]; k, v [B, Hkv, N, D] (unit stride along D); rows [B, Hkv, R] int64, -1 = unused
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4 && rows.dim() == 3, "shared_rows_attention: bad ranks");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "shared_rows_attention: unit stride along D");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "shared_rows_attention: rows int64");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "shared_rows_attention: dtypes");
  const int64_t b = q.size(0), hq = q.size(1), d = q.size(2), hkv = k.size(1), n = k.size(2), width = rows.size(2);
  TORCH_CHECK(hq % hkv == 0 && rows.size(0) == b && rows.size(1) == hkv && v.size(2) == n, "shared_rows_attention: shapes");
  const int64_t group = hq / hkv;
  auto out = at::zeros({b, hq, d}, q.options());
  auto lse = at::empty({b, hq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "shared_rows_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const int64_t* rp = rows.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* lp = lse.data_ptr<scalar_t>();
    const scalar_t sc = static_cast<scalar_t>(scale);
    at::parallel_for(0, b * hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> logits(group * width);
      std::vector<const scalar_t*> keys(width), values(width);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bi = i / hkv, g = i % hkv;
        const int64_t* sel = rp + i * width;
        int64_t m = 0;
        for (int64_t j = 0; j < width; ++j) {
          const int64_t t = sel[j];
          if (t < 0 || t >= n) continue;
          keys[m] = kp + bi * k.stride(0) + g * k.stride(1) + t * k.stride(2);
          values[m] = vp + bi * v.stride(0) + g * v.stride(1) + t * v.stride(2);
          ++m;
        }
        for (int64_t h = 0; h < group; ++h) {
          const int64_t head = g * group + h;
          const scalar_t* qh = qp + bi * q.stride(0) + head * q.stride(1);
          scalar_t* oh = op + (bi * hq + head) * d;
          scalar_t* lh = logits.data() + h * width;
          if (m == 0) {
            lp[bi * hq + head] = -std::numeric_limits<scalar_t>::infinity();
            continue;
          }
          scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
          for (int64_t j = 0; j < m; ++j) {
            const scalar_t* kr = keys[j];
            scalar_t acc = 0;
_Pragma("omp simd reduction(+ : acc)")
            for (int64_t x = 0; x < d; ++x) acc += qh[x] * kr[x];
            lh[j] = acc * sc;
            mx = std::max(mx, lh[j]);
          }
          scalar_t total = 0;
          for (int64_t j = 0; j < m; ++j) {
            const scalar_t p = std::exp(lh[j] - mx);
            total += p;
            const scalar_t* vr = values[j];
_Pragma("omp simd")
            for (int64_t x = 0; x < d; ++x) oh[x] += p * vr[x];
          }
          const scalar_t inv = scalar_t(1) / total;
_Pragma("omp simd")
          for (int64_t x = 0; x < d; ++x) oh[x] *= inv;
          lp[bi * hq + head] = mx + std::log(total);
        }
      }
    });
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY(spattn_cpu, m) {
  m.def("group_topk(Tensor q, Tensor labels, Tensor channels, int count) -> Tensor");
  m.def("shared_rows_attention(Tensor q, Tensor k, Tensor v, Tensor rows, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(spattn_cpu, CPU, m) {
  m.impl("group_topk", &group_topk);
  m.impl("shared_rows_attention", &shared_rows_attention);
}
