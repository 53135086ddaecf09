// Partial tiles of a block Layout, shared by the compiled forward and backward: per mask row the span
// of allowed columns, and a walk over a tile's rows in slices, each with the columns its rows may see,
// so the GEMMs skip what no row of the slice computes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace spattn_tiles {

// Rows of a partial tile are attended in slices of this many, each against the key columns its
// rows' masks reach (a causal diagonal tile of 128 x 128 then computes 5/8 of its pairs, not all).
constexpr int64_t kMaskRows = 32;

// For each mask row: [first, last + 1) of its allowed columns (first = last + 1 = 0 when none).
struct MaskExtents {
  std::vector<int32_t> begin, end;
  MaskExtents(const uint8_t* masks, int64_t count, int64_t rows, int64_t cols) : begin(count * rows), end(count * rows) {
    for (int64_t r = 0; r < count * rows; ++r) {
      const uint8_t* row = masks + r * cols;
      int64_t lo = 0, hi = cols;
      while (lo < cols && !row[lo]) ++lo;
      while (hi > lo && !row[hi - 1]) --hi;
      begin[r] = static_cast<int32_t>(lo < hi ? lo : 0);
      end[r] = static_cast<int32_t>(lo < hi ? hi : 0);
    }
  }
};

// Columns [c0, c1) of a partial tile that rows [i0, i0 + rows) may see (their masks' union); c1 <= c0: none.
inline std::pair<int64_t, int64_t> slice_columns(const int32_t* lo, const int32_t* hi, int64_t i0, int64_t rows,
                                                 int64_t n) {
  int64_t c0 = n, c1 = 0;
  for (int64_t i = i0; i < i0 + rows; ++i)
    if (hi[i] > lo[i]) c0 = std::min<int64_t>(c0, lo[i]), c1 = std::max<int64_t>(c1, hi[i]);
  return {c0, std::min(c1, n)};
}

// fn(i0, rows, c0, c1) for each slice of kMaskRows rows of a partial tile (mask id `mask`, m rows, n
// columns), with [c0, c1) the columns the slice's masks reach (c1 <= c0: none).
template <typename Fn>
void for_each_slice(const MaskExtents& extents, int32_t mask, int64_t block_q, int64_t m, int64_t n, Fn&& fn) {
  const int32_t* lo = extents.begin.data() + mask * block_q;
  const int32_t* hi = extents.end.data() + mask * block_q;
  for (int64_t i0 = 0; i0 < m; i0 += kMaskRows) {
    const int64_t rows = std::min(kMaskRows, m - i0);
    const auto [c0, c1] = slice_columns(lo, hi, i0, rows, n);
    fn(i0, rows, c0, c1);
  }
}
}  // namespace spattn_tiles
