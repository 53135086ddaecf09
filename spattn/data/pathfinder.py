"""Pathfinder / Path-X (Linsley et al., NeurIPS 2018; Kim, Linsley et al., ICLR 2020; LRA, Tay et al. 2021).

An image shows dashed curved contours ("snakes" of short line segments, "paddles") and two round
markers. Label 1: both markers sit on the two ends of the same contour; label 0: they sit on ends of
two different contours. An independent renderer with the semantics of ``drewlinsley/pathfinder``
(``reference/benchmarks.md`` §2.3):

* paddles are anti-aliased line segments (supersampled coverage, box-filtered, times a contrast);
* a snake starts at a free pixel with a uniform orientation; each next paddle starts ``2*margin`` px
  after the previous one and turns by an angle ``d`` drawn from the candidates on a circle (about 1 px
  apart) with weight ``cos(min(|d| * continuity, pi/2))^2``, among the candidates that fit (not too
  close to another contour, not touching an older paddle of its own snake, inside the frame) — the
  original masks its weights by the occupancy map the same way;
* two target snakes of ``contour_length`` paddles are seeded ``seed_distance`` px apart and grown
  alternately; ``num_distractors`` distractor snakes of ``contour_length // 3`` paddles follow;
* markers (discs of ``marker_radius``) sit at the origin tip of target ``i`` and at the far tip of
  target ``i`` (label 1) or of the other target (label 0); so only connectivity tells the classes apart.

**Connectivity is exact on the rendered pixels.** Every lit pixel (value > 0 in the final uint8
image) belongs to one contour; pixels of *different* contours (markers included) are more than
``link`` apart in Chebyshev distance, and consecutive paddles of a contour are within ``link``.
So the connected components of the lit pixels under "Chebyshev distance <= link" are exactly the
contours, and the label equals "the two markers are in the same component" (the tests check this
with their own flood fill). ``link = 2 * max(paddle_margin)``: 2 px at 32x32 and 64x64.

Parameters per resolution follow the LRA TFDS builder (the table in §2.3); ``difficulty`` picks the
contour length: ``"easy"`` 6 (``curv_baseline``), ``"intermediate"`` 9, ``"hard"`` 14 (the LRA task,
``curv_contour_length_14``). Deviations: no PIL/OpenCV (our own supersampled renderer); the spacing
rule is the pixel-exact ``link`` rule above instead of a disc-dilated mask, which is stricter at 32x32
(about 2-3 of the 5 distractors fit on average, see the README numbers); a contour that reaches a dead
end first undoes its last paddles (a bounded budget) before the image is restarted, where the original
retries whole contours; single-paddle distractors are not drawn (LRA's wrapper disabled them too).

Images are rendered in vectorised lock-step batches (numpy over a chunk of images) and cached to
disk as a uint8 array; see :func:`generate` for what determines an image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import is_int
from ._common import cached_arrays, check_positive_int, collate_classification, item_index

__all__ = ["PathfinderConfig", "PathfinderDataset", "config_for", "generate", "collate", "DIFFICULTIES"]

DIFFICULTIES = {"easy": 6, "intermediate": 9, "hard": 14}
_VERSION = 2


@dataclass(frozen=True)
class PathfinderConfig:
    """Generator parameters (lengths in pixels, angles in degrees)."""

    resolution: int = 32
    contour_length: int = 14
    distractor_length: int = 4
    num_distractors: int = 5
    paddle_length: float = 2.0
    paddle_thickness: float = 0.5
    paddle_margins: tuple = (1,)
    padding: int = 1
    marker_radius: float = 1.5
    seed_distance: float = 7.0
    continuity: float = 1.0
    contrast: float = 2.0
    supersample: int = 4
    subpixel: int = 4
    max_target_tries: int = 400
    max_distractor_tries: int = 10
    backtrack_budget: int = 40

    @property
    def link(self) -> int:
        return 2 * max(self.paddle_margins)

    def validate(self) -> "PathfinderConfig":
        check_positive_int("resolution", self.resolution, 8)
        check_positive_int("contour_length", self.contour_length, 1)
        check_positive_int("distractor_length", self.distractor_length, 1)
        check_positive_int("num_distractors", self.num_distractors, 0)
        check_positive_int("padding", self.padding, 0)
        for name in ("supersample", "subpixel", "max_target_tries", "max_distractor_tries"):
            check_positive_int(name, getattr(self, name), 1)
        check_positive_int("backtrack_budget", self.backtrack_budget, 0)
        for name in ("paddle_length", "paddle_thickness", "marker_radius", "seed_distance", "continuity", "contrast"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"PathfinderConfig.{name} must be a positive finite number, got {v!r}")
        if (
            not isinstance(self.paddle_margins, (tuple, list))
            or not self.paddle_margins
            or any(not is_int(m) or m < 1 for m in self.paddle_margins)
        ):
            raise ValueError(f"PathfinderConfig.paddle_margins must be positive ints, got {self.paddle_margins!r}")
        return self


# resolution -> (paddle_length, thickness, margins, marker_radius, seed_distance, continuity, contrast, distractor budget)
_PRESETS = {
    32: (2.0, 0.5, (1,), 1.5, 7.0, 1.0, 2.0, 20),
    64: (5.0, 1.0, (1,), 2.5, 12.0, 1.8, 0.8, 22),
    128: (5.0, 1.5, (2, 3), 3.0, 20.0, 1.8, 0.9, 35),
    256: (5.0, 2.0, (3,), 5.0, 27.0, 1.8, 1.0, 30),
}


def config_for(resolution: int = 32, difficulty: str = "hard", **overrides) -> PathfinderConfig:
    """The LRA parameters for ``resolution`` in {32, 64, 128 (Path-X), 256} and a difficulty."""
    if resolution not in _PRESETS:
        raise ValueError(f"resolution must be one of {sorted(_PRESETS)}, got {resolution!r}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    L, t, margins, mr, sd, cont, contrast, budget = _PRESETS[resolution]
    n = DIFFICULTIES[difficulty]
    dl = max(1, n // 3)
    cfg = PathfinderConfig(
        resolution=resolution,
        contour_length=n,
        distractor_length=dl,
        num_distractors=max(1, budget // dl),
        paddle_length=L,
        paddle_thickness=t,
        paddle_margins=margins,
        marker_radius=mr,
        seed_distance=sd,
        continuity=cont,
        contrast=contrast,
    )
    return replace(cfg, **overrides).validate()


# ------------------------------------------------------------------------------------------- rendering


def _coverage(points_y, points_x, ay, ax, by, bx, half_width):
    """1 where a subsample lies within ``half_width`` of segment a-b (broadcasting)."""
    dy, dx = by - ay, bx - ax
    den = dy * dy + dx * dx
    t = np.clip(((points_y - ay) * dy + (points_x - ax) * dx) / np.where(den > 0, den, 1.0), 0.0, 1.0)
    ey, ex = points_y - (ay + t * dy), points_x - (ax + t * dx)
    return (ey * ey + ex * ex) <= half_width * half_width


@lru_cache(maxsize=8)
def _paddle_table(length: float, thickness: float, contrast: float, supersample: int, subpixel: int):
    """Pre-rendered paddles for every angle 0..359 and start offset ``(fy/q, fx/q)``, ``q = subpixel``.

    Returns ``(dr, dc, val)``, each ``[360, q, q, K]``: the lit pixels of the paddle relative to the
    integer part of its start point, and their uint8 intensities (``val == 0`` marks unused slots).
    Pixel ``(r, c)`` covers ``[r-0.5, r+0.5] x [c-0.5, c+0.5]``; coverage is the fraction of
    ``supersample^2`` sub-samples within ``thickness/2`` of the segment, times ``contrast``.
    """
    W = int(math.ceil(length + thickness / 2 + 1.5))
    s, q = supersample, subpixel
    sub = (np.arange(s) + 0.5) / s - 0.5
    grid = np.arange(-W, W + 1)
    p = (grid[:, None] + sub[None, :]).reshape(-1)
    py, px = np.meshgrid(p, p, indexing="ij")
    ang = np.deg2rad(np.arange(360))
    f = np.arange(q) / q
    ay, ax = np.meshgrid(f, f, indexing="ij")  # [q, q]
    imgs = np.zeros((360, q, q, 2 * W + 1, 2 * W + 1), dtype=np.uint8)
    for a in range(360):
        by, bx = ay + length * math.sin(ang[a]), ax + length * math.cos(ang[a])
        cov = _coverage(
            py[None, None],
            px[None, None],
            ay[..., None, None],
            ax[..., None, None],
            by[..., None, None],
            bx[..., None, None],
            thickness / 2,
        )
        cov = cov.reshape(q, q, 2 * W + 1, s, 2 * W + 1, s).mean(axis=(3, 5))
        imgs[a] = np.round(np.clip(cov * contrast, 0, 1) * 255).astype(np.uint8)
    flat = imgs.reshape(360, q, q, -1)
    K = int((flat > 0).sum(-1).max())
    order = np.argsort(flat == 0, axis=-1, kind="stable")[..., :K]  # lit pixels first
    val = np.take_along_axis(flat, order, axis=-1)
    dr, dc = order // (2 * W + 1) - W, order % (2 * W + 1) - W
    return dr.astype(np.int64), dc.astype(np.int64), val


class _Batch:
    """Occupancy and contours of ``B`` images grown in lock-step (every operation is vectorised over images).

    ``owner [B, H, H]`` holds the contour id of each lit pixel (-1 = empty) and ``pidx`` its paddle index
    within the contour; both are padded by ``pad`` pixels so neighbourhood look-ups need no clipping
    (image pixel ``(r, c)`` is ``owner[:, r + pad, c + pad]``). Paddle ``k`` of contour ``c`` in image ``b``
    is stored as its lit pixels ``rows/cols/vals [B, C, n, K]`` (``vals == 0`` = unused slot), its
    quantised start/end points and its angle. ``row_all``/``row_own`` count lit pixels within ``link``
    columns (a separable dilation), so painting and checking cost ``2*link+1`` look-ups per pixel.
    """

    def __init__(self, cfg: PathfinderConfig, B: int, rng: np.random.Generator):
        self.cfg, self.B, self.R, self.rng = cfg, B, cfg.resolution, rng
        self.table = _paddle_table(cfg.paddle_length, cfg.paddle_thickness, cfg.contrast, cfg.supersample, cfg.subpixel)
        K = self.table[0].shape[-1]
        self.C = 2 + cfg.num_distractors
        n = max(cfg.contour_length, cfg.distractor_length)
        k = cfg.link
        self.pad = k + 2
        H = self.R + 2 * self.pad
        self.owner = np.full((B, H, H), -1, dtype=np.int16)
        self.pidx = np.zeros((B, H, H), dtype=np.int16)
        # row_all[b, y, x]: lit pixels (counted per paint) in row y within `link` columns of x;
        # row_own[b, c, y, x]: the same for contour c only. Another contour has a pixel within Chebyshev
        # distance `link` of (y, x) iff row_all > row_own[c] in one of the rows y-link .. y+link.
        self.row_all = np.zeros((B, H, H), dtype=np.int16)
        self.row_own = np.zeros((B, self.C, H, H), dtype=np.int16)
        self.rows = np.zeros((B, self.C, n, K), dtype=np.int64)
        self.cols = np.zeros((B, self.C, n, K), dtype=np.int64)
        self.vals = np.zeros((B, self.C, n, K), dtype=np.uint8)
        self.start = np.zeros((B, self.C, n, 2))
        self.end = np.zeros((B, self.C, n, 2))
        self.angle = np.zeros((B, self.C, n), dtype=np.int64)
        self.length = np.zeros((B, self.C), dtype=np.int64)
        self.margin = rng.choice(np.asarray(cfg.paddle_margins), size=B)
        oy, ox = np.meshgrid(np.arange(-k, k + 1), np.arange(-k, k + 1), indexing="ij")
        self.nb = (oy.reshape(-1), ox.reshape(-1))
        self.span = np.arange(-k, k + 1)
        # turn candidates ~1 px apart on the circle of radius length + gap, weighted by continuity
        radius = cfg.paddle_length + 2 * max(cfg.paddle_margins)
        m = max(8, int(round(2 * math.pi * radius)))
        d = (np.arange(m) * 360.0 / m + 180.0) % 360.0 - 180.0
        w = np.cos(np.minimum(np.abs(np.deg2rad(d)) * cfg.continuity, math.pi / 2)) ** 2
        self.turns, self.turn_w = np.round(d[w > 1e-12]).astype(np.int64), w[w > 1e-12] / w[w > 1e-12].sum()

    # -- geometry ------------------------------------------------------------------------------------------

    def _evaluate(self, bs, cs, ks, ys, xs, angles):
        """Candidate paddles ``ks`` of contours ``cs`` in images ``bs`` (``[A]``), starting near ``ys/xs [A, J]``
        at ``angles [A, J]``. Valid: end points and lit pixels inside the frame; no lit pixel of another
        contour within Chebyshev distance ``link``; no contact with own paddles older than the previous
        one; and (``ks > 0``) a lit pixel within ``link`` of the previous paddle's."""
        cfg, R, P, q = self.cfg, self.R, self.pad, self.cfg.subpixel
        angles = angles % 360
        qy, qx = np.round(ys * q).astype(np.int64), np.round(xs * q).astype(np.int64)
        iy, fy, ix, fx = qy // q, qy % q, qx // q, qx % q
        sy, sx = qy / q, qx / q
        th = np.deg2rad(angles)
        ey, ex = sy + cfg.paddle_length * np.sin(th), sx + cfg.paddle_length * np.cos(th)
        lo, hi = cfg.padding, R - 1 - cfg.padding
        ok = (
            (np.minimum(sy, ey) >= lo)
            & (np.maximum(sy, ey) <= hi)
            & (np.minimum(sx, ex) >= lo)
            & (np.maximum(sx, ex) <= hi)
        )
        dr, dc, val = self.table
        rows = iy[..., None] + dr[angles, fy, fx]  # [A, J, K]
        cols = ix[..., None] + dc[angles, fy, fx]
        vals = val[angles, fy, fx]
        lit = vals > 0
        ok &= (((rows >= 0) & (rows < R) & (cols >= 0) & (cols < R)) | ~lit).all(axis=2)
        rp = np.clip(rows, -P + self.cfg.link, R - 1 + P - self.cfg.link) + P
        cp = np.clip(cols, -P + self.cfg.link, R - 1 + P - self.cfg.link) + P
        b3, c3 = bs[:, None, None], cs[:, None, None]
        ry = rp[..., None] + self.span  # [A, J, K, 2k+1]
        bad = (
            self.row_all[b3[..., None], ry, cp[..., None]]
            > self.row_own[b3[..., None], c3[..., None], ry, cp[..., None]]
        ).any(axis=3)
        bad |= (self.owner[b3, rp, cp] == c3) & (self.pidx[b3, rp, cp] < (ks - 1)[:, None, None])
        ok &= ~(bad & lit).any(axis=2)
        has_prev = ks > 0
        if has_prev.any():
            kp = np.maximum(ks - 1, 0)
            pr = self.rows[bs, cs, kp] + P  # [A, K]
            pc = self.cols[bs, cs, kp] + P
            plit = self.vals[bs, cs, kp] > 0
            cheb = np.maximum(
                np.abs(rp[..., None] - pr[:, None, None, :]), np.abs(cp[..., None] - pc[:, None, None, :])
            )
            cheb = np.where(plit[:, None, None, :], cheb, 1 << 20).min(axis=3)
            near = ((cheb <= cfg.link) & lit).any(axis=2)
            ok &= near | ~has_prev[:, None]
        return ok, (rows, cols, vals, sy, sx, ey, ex, angles)

    def _choose(self, ok, weights) -> np.ndarray:
        """Per row, a candidate drawn with ``weights`` among the valid ones (-1 if none); inverse CDF."""
        w = np.where(ok, weights, 0.0)
        tot = w.sum(axis=1)
        u = self.rng.random(len(w)) * tot
        j = np.minimum((np.cumsum(w, axis=1) <= u[:, None]).sum(axis=1), w.shape[1] - 1)
        return np.where(tot > 0, j, -1)

    def _commit(self, bs, cs, j, cand) -> None:
        rows, cols, vals, sy, sx, ey, ex, angles = cand
        a = np.arange(len(bs))
        ks = self.length[bs, cs]
        r, c, v = rows[a, j], cols[a, j], vals[a, j]
        self.rows[bs, cs, ks], self.cols[bs, cs, ks], self.vals[bs, cs, ks] = r, c, v
        self.start[bs, cs, ks] = np.stack([sy[a, j], sx[a, j]], axis=1)
        self.end[bs, cs, ks] = np.stack([ey[a, j], ex[a, j]], axis=1)
        self.angle[bs, cs, ks] = angles[a, j]
        self.length[bs, cs] = ks + 1
        self._paint(bs, cs, ks, r, c, v)

    def _paint(self, bs, cs, ks, r, c, v, sign: int = 1) -> None:
        """Add (``sign=1``) or remove (``-1``) lit pixels ``r, c [A, K]`` (``v > 0``) of contours ``cs``."""
        lit = v > 0
        bb = np.broadcast_to(bs[:, None], r.shape)[lit]
        cc = np.broadcast_to(cs[:, None], r.shape)[lit]
        P = self.pad
        rr, cl = r[lit] + P, c[lit] + P
        if sign > 0:
            self.owner[bb, rr, cl] = cc
            self.pidx[bb, rr, cl] = np.broadcast_to(ks[:, None], r.shape)[lit]
        else:
            self.owner[bb, rr, cl] = -1
        nc = cl[:, None] + self.span
        nr = np.broadcast_to(rr[:, None], nc.shape)
        b2 = np.broadcast_to(bb[:, None], nc.shape)
        np.add.at(self.row_all, (b2, nr, nc), sign)
        np.add.at(self.row_own, (b2, np.broadcast_to(cc[:, None], nc.shape), nr, nc), sign)

    def pop(self, bs, cs) -> None:
        """Undo the last paddle of contour ``cs[i]`` in image ``bs[i]`` (it only overlaps the one before)."""
        ks = self.length[bs, cs] - 1
        self._paint(bs, cs, ks, self.rows[bs, cs, ks], self.cols[bs, cs, ks], self.vals[bs, cs, ks], -1)
        self.vals[bs, cs, ks] = 0
        self.length[bs, cs] = ks
        back = ks > 0
        if back.any():  # shared pixels were reset to empty: give them back to the previous paddle
            b2, c2, k2 = bs[back], cs[back], ks[back] - 1
            r, c, v = self.rows[b2, c2, k2], self.cols[b2, c2, k2], self.vals[b2, c2, k2]
            lit = v > 0
            bb = np.broadcast_to(b2[:, None], r.shape)[lit]
            P = self.pad
            self.owner[bb, r[lit] + P, c[lit] + P] = np.broadcast_to(c2[:, None], r.shape)[lit]
            self.pidx[bb, r[lit] + P, c[lit] + P] = np.broadcast_to(k2[:, None], r.shape)[lit]

    def clear(self, bs, cs) -> None:
        """Remove contours ``cs`` of images ``bs`` entirely (no two contours share a pixel)."""
        bs, cs = np.asarray(bs, dtype=np.int64), np.asarray(cs, dtype=np.int64)
        if len(bs) == 0:
            return
        A, n, K = len(bs), self.rows.shape[2], self.rows.shape[3]
        r = self.rows[bs, cs].reshape(A, n * K)
        c = self.cols[bs, cs].reshape(A, n * K)
        v = self.vals[bs, cs].reshape(A, n * K)
        self._paint(bs, cs, np.zeros(A, dtype=np.int64), r, c, v, -1)
        self.vals[bs, cs] = 0
        self.length[bs, cs] = 0

    # -- growth --------------------------------------------------------------------------------------------

    def seed(self, bs, cs, ys, xs) -> np.ndarray:
        """First paddle at ``(ys, xs)``: a uniform orientation among 24 (15 degrees apart, random phase) that fit."""
        A = len(bs)
        angles = (self.rng.integers(15, size=(A, 1)) + 15 * np.arange(24)[None]) % 360
        ok, cand = self._evaluate(
            bs, cs, np.zeros(A, dtype=np.int64), np.repeat(ys[:, None], 24, 1), np.repeat(xs[:, None], 24, 1), angles
        )
        return self._take(bs, cs, self._choose(ok, np.ones(24)), cand)

    def extend(self, bs, cs) -> np.ndarray:
        """Next paddle, ``2*margin`` after the last one, turning by a candidate angle drawn with the
        continuity weights among the candidates that fit (the original masks its weights the same way)."""
        ks = self.length[bs, cs]
        last = ks - 1
        angles = (self.angle[bs, cs, last][:, None] + self.turns[None, :]) % 360
        th = np.deg2rad(angles)
        gap = 2 * self.margin[bs][:, None]
        ys = self.end[bs, cs, last, 0][:, None] + gap * np.sin(th)
        xs = self.end[bs, cs, last, 1][:, None] + gap * np.cos(th)
        ok, cand = self._evaluate(bs, cs, ks, ys, xs, angles)
        return self._take(bs, cs, self._choose(ok, self.turn_w), cand)

    def _take(self, bs, cs, j, cand) -> np.ndarray:
        good = j >= 0
        if good.any():
            self._commit(bs[good], cs[good], j[good], tuple(x[good] for x in cand))
        return good

    def grow(self, bs, cs, budget: np.ndarray) -> np.ndarray:
        """One growth step for contours ``cs`` of images ``bs`` (already seeded, not yet full length).

        A dead end undoes the last paddle (spending one unit of ``budget[b]``). Returns "failed for good"
        ``[A]`` (dead end with no budget left or nothing to undo)."""
        good = self.extend(bs, cs)
        fail = ~good
        can_undo = fail & (budget[bs] > 0) & (self.length[bs, cs] >= 2)
        if can_undo.any():
            budget[bs[can_undo]] -= 1
            self.pop(bs[can_undo], cs[can_undo])
        return fail & ~can_undo


def _disc_pixels(radius: float, supersample: int, subpixel: int):
    """Discs for every centre offset ``(fy/q, fx/q)``: ``(dr, dc, val)`` each ``[q, q, K]``."""
    W = int(math.ceil(radius + 1))
    q, s = subpixel, supersample
    sub = (np.arange(s) + 0.5) / s - 0.5
    p = (np.arange(-W, W + 1)[:, None] + sub).reshape(-1)
    imgs = np.zeros((q, q, 2 * W + 1, 2 * W + 1), dtype=np.uint8)
    for fy in range(q):
        for fx in range(q):
            inside = ((p[:, None] - fy / q) ** 2 + (p[None, :] - fx / q) ** 2) <= radius * radius
            cov = inside.reshape(2 * W + 1, s, 2 * W + 1, s).mean(axis=(1, 3))
            imgs[fy, fx] = np.round(np.clip(cov, 0, 1) * 255).astype(np.uint8)
    flat = imgs.reshape(q, q, -1)
    K = int((flat > 0).sum(-1).max())
    order = np.argsort(flat == 0, axis=-1, kind="stable")[..., :K]
    return order // (2 * W + 1) - W, order % (2 * W + 1) - W, np.take_along_axis(flat, order, axis=-1)


def _place_markers(batch: _Batch, bs, label, which):
    """Markers on the origin tip of target ``which`` and the far tip of the same (label 1) or the other
    target (label 0). A marker must keep ``link`` away from other contours. Returns (ok [A], marker data)."""
    cfg, P, q = batch.cfg, batch.pad, batch.cfg.subpixel
    dr, dc, val = _disc_pixels(cfg.marker_radius, cfg.supersample, q)
    other = np.where(label[bs] == 1, which[bs], 1 - which[bs])
    origin = batch.start[bs, which[bs], 0]  # [A, 2]
    term = batch.end[bs, other, batch.length[bs, other] - 1]
    ok = np.ones(len(bs), dtype=bool)
    out = []
    for cid, centre in ((which[bs], origin), (other, term)):
        qc = np.round(centre * q).astype(np.int64)
        i, f = qc // q, qc % q
        r = i[:, 0, None] + dr[f[:, 0], f[:, 1]]
        c = i[:, 1, None] + dc[f[:, 0], f[:, 1]]
        v = val[f[:, 0], f[:, 1]]
        lit = v > 0
        R = batch.R
        ok &= (((r >= 0) & (r < R) & (c >= 0) & (c < R)) | ~lit).all(axis=1)
        rp = np.clip(r, -P + cfg.link, R - 1 + P - cfg.link) + P
        cp = np.clip(c, -P + cfg.link, R - 1 + P - cfg.link) + P
        o = batch.owner[bs[:, None, None], rp[..., None] + batch.nb[0], cp[..., None] + batch.nb[1]]
        ok &= ~(((o != -1) & (o != cid[:, None, None])).any(axis=2) & lit).any(axis=1)
        out.append((cid, qc / q, r, c, v))
    # two markers on different contours must also stay more than `link` apart
    (_, _, r1, c1, v1), (_, _, r2, c2, v2) = out
    cheb = np.maximum(np.abs(r1[:, :, None] - r2[:, None, :]), np.abs(c1[:, :, None] - c2[:, None, :]))
    close = ((cheb <= cfg.link) & (v1[:, :, None] > 0) & (v2[:, None, :] > 0)).any(axis=(1, 2))
    ok &= ~(close & (label[bs] == 0))
    return ok, out


def _render_chunk(cfg: PathfinderConfig, B: int, rng: np.random.Generator):
    """Render ``B`` images with ``rng`` -> ``(images uint8 [B, R, R], labels [B], markers [B, 2, 2] float,
    distractors placed [B])``."""
    batch = _Batch(cfg, B, rng)
    R = cfg.resolution
    label = rng.integers(2, size=B)
    which = rng.integers(2, size=B)
    done = np.zeros(B, dtype=bool)
    tries = np.zeros(B, dtype=np.int64)
    budget = np.full(B, cfg.backtrack_budget)
    markers = np.zeros((B, 2, 2))
    mpix = [None] * B
    zero = np.zeros(0, dtype=np.int64)
    c0, c1 = np.zeros(B, dtype=np.int64), np.ones(B, dtype=np.int64)
    while not done.all():
        # (re)start: seed both targets, seed_distance apart, away from the borders
        need = np.nonzero(~done & (batch.length[:, 0] == 0))[0]
        if len(need):
            tries[need] += 1
            if tries[need].max() > cfg.max_target_tries:
                raise RuntimeError(
                    f"could not place two target contours in {cfg.max_target_tries} tries; "
                    f"the image is too small for this contour length ({cfg})"
                )
            budget[need] = cfg.backtrack_budget
            border = min(2 * cfg.seed_distance, (R - 1) / 2 - 1)
            p0 = rng.uniform(border, R - 1 - border, size=(len(need), 2))
            phi = rng.uniform(0, 2 * math.pi, size=len(need))
            p1 = p0 + cfg.seed_distance * np.stack([np.sin(phi), np.cos(phi)], axis=1)
            ok = batch.seed(need, c0[need], p0[:, 0], p0[:, 1])
            sub = need[ok]
            ok1 = batch.seed(sub, c1[sub], p1[ok, 0], p1[ok, 1]) if len(sub) else zero.astype(bool)
            batch.clear(need[~ok], c0[need[~ok]])
            batch.clear(sub[~ok1], c0[sub[~ok1]])
        # grow the shorter target of every unfinished image by one paddle
        act = np.nonzero(~done & (batch.length[:, 0] > 0) & (batch.length[:, 1] > 0))[0]
        n = cfg.contour_length
        fin = act[(batch.length[act, 0] >= n) & (batch.length[act, 1] >= n)]
        act = act[(batch.length[act, 0] < n) | (batch.length[act, 1] < n)]
        if len(act):
            la, lb = batch.length[act, 0], batch.length[act, 1]
            cs = np.where((la <= lb) & (la < n) | (lb >= n), 0, 1)
            dead = batch.grow(act, cs, budget)
            for c in (0, 1):
                batch.clear(act[dead], np.full(int(dead.sum()), c))
        if len(fin):
            ok, out = _place_markers(batch, fin, label, which)
            for c in (0, 1):
                batch.clear(fin[~ok], np.full(int((~ok).sum()), c))
            good = fin[ok]
            for slot, (cid, centre, r, c, v) in enumerate(out):
                markers[good, slot] = centre[ok]
                batch._paint(good, cid[ok], np.full(len(good), 1 << 14), r[ok], c[ok], v[ok])
                for t, b in enumerate(good):
                    mpix[b] = (mpix[b] or []) + [(r[ok][t], c[ok][t], v[ok][t])]
            done[good] = True
    # distractors, one contour id at a time, each image retrying a few times
    placed = np.zeros(B, dtype=np.int64)
    for d in range(cfg.num_distractors):
        cid = 2 + d
        left = np.full(B, cfg.max_distractor_tries)
        dbudget = np.full(B, max(1, cfg.backtrack_budget // 4))
        cs_all = np.full(B, cid)
        while True:
            need = np.nonzero((batch.length[:, cid] == 0) & (left > 0))[0]
            if len(need):
                left[need] -= 1
                p = rng.uniform(cfg.padding, R - 1 - cfg.padding, size=(len(need), 2))
                batch.seed(need, cs_all[need], p[:, 0], p[:, 1])
            act = np.nonzero((batch.length[:, cid] > 0) & (batch.length[:, cid] < cfg.distractor_length))[0]
            if len(act) == 0 and not ((batch.length[:, cid] == 0) & (left > 0)).any():
                break
            if len(act):
                dead = batch.grow(act, cs_all[act], dbudget)
                batch.clear(act[dead], cs_all[act[dead]])
        placed += batch.length[:, cid] == cfg.distractor_length
    # compose: max over every lit pixel of every paddle and marker
    images = np.zeros((B, R, R), dtype=np.uint8)
    lit = batch.vals > 0
    bidx = np.broadcast_to(np.arange(B)[:, None, None, None], lit.shape)[lit]
    np.maximum.at(images, (bidx, batch.rows[lit], batch.cols[lit]), batch.vals[lit])
    for b in range(B):
        for r, c, v in mpix[b]:
            m = v > 0
            np.maximum.at(images[b], (r[m], c[m]), v[m])
    return images, label, markers, placed


CHUNK = 256


def generate(
    num_examples: int,
    seed: int = 0,
    cfg: Optional[PathfinderConfig] = None,
    progress: bool = False,
    return_info: bool = False,
):
    """Render ``num_examples`` images -> ``(images uint8 [E, R, R], labels int64 [E])`` (+ ``info`` dict).

    Images are rendered in lock-step chunks of ``CHUNK`` (the last one smaller); chunk ``c`` uses the
    generator ``default_rng([seed, c])``, so the result is a deterministic function of ``(seed, cfg,
    num_examples)`` and every full chunk does not depend on ``num_examples``. Labels are uniform (≈ balanced).
    ``info``: ``markers [E, 2, 2]`` (row, col of the two marker centres), ``distractors [E]``, ``link``.
    """
    if cfg is not None and not isinstance(cfg, PathfinderConfig):
        raise TypeError(f"cfg must be a PathfinderConfig (see config_for) or None, got {type(cfg).__name__}")
    cfg = (cfg or config_for()).validate()
    check_positive_int("num_examples", num_examples, 0)
    check_positive_int("seed", seed, 0)
    R = cfg.resolution
    images = np.zeros((num_examples, R, R), dtype=np.uint8)
    labels = np.zeros(num_examples, dtype=np.int64)
    markers = np.zeros((num_examples, 2, 2))
    placed = np.zeros(num_examples, dtype=np.int64)
    chunks = range(0, num_examples, CHUNK)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_examples, desc=f"pathfinder{R}", unit="img")
    for c, a in enumerate(chunks):
        b = min(num_examples, a + CHUNK)
        images[a:b], labels[a:b], markers[a:b], placed[a:b] = _render_chunk(
            cfg, b - a, np.random.default_rng([seed, c])
        )
        if bar is not None:
            bar.update(b - a)
    if bar is not None:
        bar.close()
    if return_info:
        return images, labels, {"markers": markers, "distractors": placed, "link": cfg.link}
    return images, labels


class PathfinderDataset(Dataset):
    """Pathfinder images as pixel tokens; item ``i`` is ``(tokens LongTensor [R*R] in 0..255, label 0|1)``.

    Row-major pixels, ``vocab_size = 256``, ``num_classes = 2``; every sequence has length ``R*R`` so
    nothing is padded (pixel value 0 is real data: masks come from lengths). Generated once and cached
    as ``<cache_dir>/pathfinder<R>-<hash>.npz``. ``images`` holds the uint8 array ``[N, R, R]``.
    """

    vocab_size = 256
    num_classes = 2
    pad_id = 0

    def __init__(
        self,
        num_examples: int = 10_000,
        seed: int = 0,
        resolution: int = 32,
        difficulty: str = "hard",
        cache_dir: Optional[str] = None,
        use_cache: bool = True,
        progress: bool = False,
        **overrides,
    ):
        cfg = config_for(resolution, difficulty, **overrides)
        check_positive_int("num_examples", num_examples, 0)
        check_positive_int("seed", seed, 0)
        params = dict(version=_VERSION, n=num_examples, seed=seed, cfg=asdict(cfg))

        def make():
            images, labels = generate(num_examples, seed, cfg, progress=progress)
            return {"images": images, "labels": labels}

        arrays = cached_arrays(f"pathfinder{resolution}", params, make, cache_dir, use_cache)
        self.images, self.labels = arrays["images"], arrays["labels"]
        if self.images.shape != (num_examples, resolution, resolution) or self.labels.shape != (num_examples,):
            raise ValueError(
                f"Pathfinder arrays have shapes {self.images.shape}/{self.labels.shape}, expected "
                f"({num_examples}, {resolution}, {resolution}) (cache file corrupt?)"
            )
        self.cfg, self.seed = cfg, seed
        self.seq_len = resolution * resolution

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        i = item_index(i, len(self), "PathfinderDataset")
        return torch.from_numpy(self.images[i].reshape(-1).astype(np.int64)), int(self.labels[i])

    @staticmethod
    def collate(items) -> dict:
        return collate(items)


def collate(items) -> dict:
    """``{"tokens": [B, R*R], "target": [B], "mask": [B, R*R] bool (all True), "lengths": [B]}``."""
    return collate_classification(items, pad_id=0)
