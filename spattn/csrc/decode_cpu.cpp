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
#include <utility>
#include <vector>

namespace {

constexpr int64_t kTokenBlock = 256;

// A label as a score operand: floating types as they are, bfloat16 (raw bits) widened to float.
template <typename T>
inline T widen(T x) { return x; }
inline float widen(uint16_t bf16_bits) {
  const uint32_t u = static_cast<uint32_t>(bf16_bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T, typename L>
void group_scores(const T* q, int64_t q_head_stride, int64_t group, const int64_t* channels, int64_t r,
                  const L* labels, int64_t channel_stride, int64_t n, T* scores) {
  std::vector<T> acc(group * kTokenBlock);
  for (int64_t t0 = 0; t0 < n; t0 += kTokenBlock) {
    const int64_t len = std::min(kTokenBlock, n - t0);
    std::fill(acc.begin(), acc.end(), T(0));
    for (int64_t c = 0; c < r; ++c) {
      const L* row = labels + c * channel_stride + t0;
      for (int64_t h = 0; h < group; ++h) {
        const T w = q[h * q_head_stride + channels[c]];
        T* a = acc.data() + h * kTokenBlock;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) a[i] += w * widen(row[i]);
      }
    }
    T* out = scores + t0;
    std::copy(acc.begin(), acc.begin() + len, out);
    for (int64_t h = 1; h < group; ++h) {
      const T* a = acc.data() + h * kTokenBlock;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) out[i] = out[i] > a[i] ? out[i] : a[i];
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
// the first pass histograms every score, later ones only the boundary bin's candidates. The passes
// are branch-free (scores are data: their comparisons would mispredict).
template <typename T>
void top_positions_radix(const T* scores, int64_t n, int64_t count, int64_t* out) {
  using Key = decltype(sort_key(T(0)));
  constexpr int kBits = 11, kBins = 1 << kBits, kKeyBits = 8 * sizeof(Key);
  int shift = kKeyBits - kBits;
  std::vector<Key> keys(n);
  std::vector<int32_t> hist(2 * kBins, 0);  // two interleaved copies: consecutive equal bins do not stall
  for (int64_t t = 0; t < n; ++t) {
    keys[t] = sort_key(scores[t]);
    ++hist[((t & 1) << kBits) + (keys[t] >> shift)];
  }
  for (int b = 0; b < kBins; ++b) hist[b] += hist[kBins + b];
  std::vector<uint8_t> keep(n, 0);
  std::vector<int64_t> cand(n), next(n);
  int64_t cands = n, need = count;
  bool first = true;
  while (true) {
    int64_t above = 0, bin = kBins - 1;
    for (; bin > 0 && above + hist[bin] < need; --bin) above += hist[bin];
    int64_t m = 0;
    for (int64_t j = 0; j < cands; ++j) {
      const int64_t t = first ? j : cand[j];
      const int64_t d = static_cast<int64_t>((keys[t] >> shift) & (kBins - 1));
      keep[t] = d > bin;
      next[m] = t;
      m += d == bin;
    }
    first = false;
    need -= above;
    cand.swap(next);
    cands = m;  // ascending positions
    if (cands <= need || shift == 0) {  // the whole bin fits, or identical keys: the earliest
      for (int64_t j = 0; j < need && j < cands; ++j) keep[cand[j]] = 1;
      break;
    }
    shift = shift >= kBits ? shift - kBits : 0;
    std::fill(hist.begin(), hist.begin() + kBins, 0);
    for (int64_t j = 0; j < cands; ++j) ++hist[(keys[cand[j]] >> shift) & (kBins - 1)];
  }
  int64_t m = 0;
  for (int64_t t = 0; t < n && m < count; ++t) {  // branch-free compaction, ascending
    out[m] = t;
    m += keep[t];
  }
}

// The same positions as top_positions_radix, faster when count is a small fraction of n: a
// threshold from a strided sample keeps a candidate set a little larger than count (every score
// >= it; when fewer than count pass, the radix select runs instead), and an nth_element over the
// candidate values gives the count-th largest score, and one pass over the candidates (ascending
// positions) keeps those above it and the earliest ties.
template <typename T>
void top_positions(const T* scores, int64_t n, int64_t count, int64_t* out, std::vector<int32_t>& passing) {
  constexpr int64_t kStride = 16;
  const int64_t samples = n / kStride;
  const int64_t rank = 2 * (count / kStride) + 8;  // about twice the expected share, so rarely too few
  if (samples < 64 || rank >= samples) return top_positions_radix(scores, n, count, out);
  std::vector<T> sample(samples);
  for (int64_t i = 0; i < samples; ++i) sample[i] = scores[i * kStride];
  std::nth_element(sample.begin(), sample.begin() + (rank - 1), sample.end(), std::greater<T>());
  const T thr = sample[rank - 1];
  passing.resize(n);  // scratch reused across rows
  int32_t* pass = passing.data();
  int64_t found = 0;
  for (int64_t t = 0; t < n; ++t) {  // branch-free: most scores fail
    pass[found] = static_cast<int32_t>(t);
    found += scores[t] >= thr;
  }
  if (found < count || std::isnan(thr)) return top_positions_radix(scores, n, count, out);
  std::vector<T> values(found);
  for (int64_t j = 0; j < found; ++j) values[j] = scores[pass[j]];
  std::nth_element(values.begin(), values.begin() + (count - 1), values.end(), std::greater<T>());
  const T kth = values[count - 1];
  int64_t above = 0;
  for (int64_t j = 0; j < found; ++j) above += scores[pass[j]] > kth;
  int64_t ties = count - above, m = 0;  // candidates are in ascending position order
  for (int64_t j = 0; j < found && m < count; ++j) {
    const T v = scores[pass[j]];
    if (v > kth || (v == kth && ties-- > 0)) out[m++] = pass[j];
  }
}

template <typename T, typename L>
void run_group_topk(const T* qp, const at::Tensor& q, const L* lp, const at::Tensor& labels, const at::Tensor& channels,
                    int64_t count, at::Tensor& out) {
  const int64_t b = q.size(0), hq = q.size(1), hkv = labels.size(1), r = labels.size(2), n = labels.size(3);
  const int64_t group = hq / hkv;
  const int64_t q_batch = q.stride(0), q_head = q.stride(1);
  const int64_t l_batch = labels.stride(0), l_head = labels.stride(1), l_channel = labels.stride(2);
  const int64_t* cp = channels.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, b * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(n);
    std::vector<int32_t> passing;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bi = i / hkv, g = i % hkv;
      group_scores(qp + bi * q_batch + g * group * q_head, q_head, group, cp + g * r, r,
                   lp + bi * l_batch + g * l_head, l_channel, n, scores.data());
      top_positions(scores.data(), n, count, op + i * count, passing);
    }
  });
}

at::Tensor group_topk(const at::Tensor& q, const at::Tensor& labels, const at::Tensor& channels, int64_t count) {
  // q [B, Hq, D]; labels [B, Hkv, r, N] (channel-major, unit stride along N); channels [Hkv, r] int64
  TORCH_CHECK(q.dim() == 3 && labels.dim() == 4 && channels.dim() == 2, "group_topk: bad ranks");
  TORCH_CHECK(labels.stride(3) == 1, "group_topk: labels must have unit stride along tokens");
  TORCH_CHECK(q.stride(2) == 1, "group_topk: q must have unit stride along channels");
  TORCH_CHECK(channels.scalar_type() == at::kLong && channels.is_contiguous(), "group_topk: channels int64");
  const int64_t b = q.size(0), hq = q.size(1), hkv = labels.size(1), r = labels.size(2), n = labels.size(3);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0 && channels.size(0) == hkv && channels.size(1) == r, "group_topk: shape mismatch");
  TORCH_CHECK(count >= 1 && count <= n, "group_topk: count out of range");
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "group_topk: at most 2^31 - 1 tokens");
  TORCH_CHECK(labels.size(0) == b, "group_topk: labels batch ", labels.size(0), " != q batch ", b);
  {  // channel ids index q's last dim: every one must lie inside it
    const int64_t* cp = channels.data_ptr<int64_t>();
    for (int64_t i = 0; i < channels.numel(); ++i)
      TORCH_CHECK(cp[i] >= 0 && cp[i] < q.size(2), "group_topk: channels must lie in [0, ", q.size(2),
                  ") (head dim of q), got ", cp[i], " at flat position ", i);
  }
  auto out = at::empty({b, hkv, count}, q.options().dtype(at::kLong));
  if (labels.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "group_topk: bfloat16 labels need float32 queries");
    run_group_topk(q.data_ptr<float>(), q, reinterpret_cast<const uint16_t*>(labels.data_ptr<at::BFloat16>()), labels,
                   channels, count, out);
  } else {
    TORCH_CHECK(q.scalar_type() == labels.scalar_type(), "group_topk: labels must have q's dtype (or bfloat16)");
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "group_topk", [&] {
      run_group_topk(q.data_ptr<scalar_t>(), q, labels.data_ptr<scalar_t>(), labels, channels, count, out);
    });
  }
  return out;
}

// Softmax attention of `group` queries (q + h * q_stride) over m shared rows; each key / value row is
// read once for the whole group. out [group, d] must be zero; lse [group].
template <typename T>
void attend_group(const T* q, int64_t q_stride, int64_t group, const T* const* keys, const T* const* values,
                  int64_t m, int64_t d, T scale, T* logits /* [group, m] */, T* out, T* lse) {
  if (m == 0) {
    for (int64_t h = 0; h < group; ++h) lse[h] = -std::numeric_limits<T>::infinity();
    return;
  }
  constexpr int64_t kAhead = 32;  // rows are scattered over the cache: fetch ahead (values too, for the second pass)
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  for (int64_t j = 0; j < m; ++j) {
    const T* kr = keys[j];
    if (j + kAhead < m)
      for (int64_t off = 0; off < row_bytes; off += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(keys[j + kAhead]) + off);
        __builtin_prefetch(reinterpret_cast<const char*>(values[j + kAhead]) + off);
      }
    for (int64_t h = 0; h < group; ++h) {
      const T* qh = q + h * q_stride;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t x = 0; x < d; ++x) acc += qh[x] * kr[x];
      logits[h * m + j] = acc * scale;
    }
  }
  std::vector<T> inv(group);
  for (int64_t h = 0; h < group; ++h) {
    T* lh = logits + h * m;
    T mx = lh[0];
    for (int64_t j = 1; j < m; ++j) mx = (lh[j] > mx || lh[j] != lh[j]) ? lh[j] : mx;  // a NaN logit sticks
    T total = 0;
    for (int64_t j = 0; j < m; ++j) {
      lh[j] = std::exp(lh[j] - mx);
      total += lh[j];
    }
    inv[h] = T(1) / total;
    lse[h] = mx + std::log(total);
  }
  for (int64_t j = 0; j < m; ++j) {
    const T* vr = values[j];
    for (int64_t h = 0; h < group; ++h) {
      const T p = logits[h * m + j];
      T* oh = out + h * d;
#pragma omp simd
      for (int64_t x = 0; x < d; ++x) oh[x] += p * vr[x];
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    T* oh = out + h * d;
#pragma omp simd
    for (int64_t x = 0; x < d; ++x) oh[x] *= inv[h];
  }
}

std::tuple<at::Tensor, at::Tensor> shared_rows_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const at::Tensor& rows, double scale) {
  // q [B, Hq, D]; k, v [B, Hkv, N, D] (unit stride along D); rows [B, Hkv, R] int64, -1 = unused
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4 && rows.dim() == 3, "shared_rows_attention: bad ranks");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "shared_rows_attention: unit stride along D");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "shared_rows_attention: rows int64");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "shared_rows_attention: dtypes");
  const int64_t b = q.size(0), hq = q.size(1), d = q.size(2), hkv = k.size(1), n = k.size(2), width = rows.size(2);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0 && rows.size(0) == b && rows.size(1) == hkv && k.size(0) == b && v.size(0) == b &&
                  v.size(1) == hkv && v.size(2) == n && k.size(3) == d && v.size(3) == d,
              "shared_rows_attention: shapes q [B, Hq, D], k, v [B, Hkv, N, D], rows [B, Hkv, R], Hq % Hkv == 0");
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
        const scalar_t* qg = qp + bi * q.stride(0) + g * group * q.stride(1);
        scalar_t* og = op + (bi * hq + g * group) * d;
        scalar_t* lg = lp + bi * hq + g * group;
        attend_group(qg, q.stride(1), group, keys.data(), values.data(), m, d, sc, logits.data(), og, lg);
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
