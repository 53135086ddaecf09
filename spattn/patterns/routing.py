"""k-means routing (Routing Transformer, Roy, Saffar, Vaswani, Grangier; TACL 2021, arXiv 2003.05997).

Per head, C centroids ``mu [H, C, D]`` live in buffers. Queries and keys are layer-normalised
without gain or bias (``LN(x)``, zero mean / unit variance over D) and scored against the centroids
by dot product, ``s = LN(x) · muᵀ``. **Balanced routing**: each centroid takes the ``w`` tokens with
the largest score (``w = ceil(N / C)`` by default, the paper's ``N / C``), and its window is that
list sorted by position. Windows run dense attention inside (``spattn.kernels.clustered``) and a
token chosen by several centroids gets the mean of their outputs, one chosen by none gets zeros.

Centroids are trained by mini-batch k-means with exponential moving averages (decay 0.999), never by
gradients: in training mode each :meth:`Routing.select` assigns every routed vector to its nearest
centroid (``argmax`` of the scores, padded keys excluded) and updates ``ema_count`` / ``ema_sum``; the
centroid is their ratio with Laplace smoothing of the counts (eps 1e-5), as in the official
``online_kmeans``. The selection of the current call uses the centroids *before* the update. The
commitment loss ``commitment * mean((LN(x) - sg(mu_assigned))²)`` (beta = 1e-4) is left on
:attr:`Routing.aux_loss` with gradients to q and k.

Initialisation: the paper draws ``LN(randn)`` centroids. Random centroids can leave a centroid that
no token ever chooses (a dead cluster that EMA never revives), so by default (``init="data"``) the
first training call replaces them by k-means on that batch (farthest-point seeding, 10 Lloyd
iterations), like the lucidrains port's first-batch initialisation. ``init="random"`` keeps the
paper's behaviour.

Causal attention, two modes:

* ``causal_safe=False`` — **what the paper used**: shared-QK routing. Windows are chosen from the
  queries (the paper's decoder has ``k = q``) by the balanced top-w over the *whole* sequence, key
  windows equal query windows, and inside a window the mask is by position. Which past tokens enter
  a query's window therefore depends on future tokens (a selection leak; the official fast decoder
  blanks future distances, so training and decoding differ).
* ``causal_safe=True`` — our variant whose choice of keys for query ``i`` never depends on tokens
  after ``i``: every token goes to its nearest centroid (argmax, depends on that token only); the
  members of a cluster, in position order, are cut into consecutive windows of ``w`` (token ``t``'s
  window is ``rank(t) // w`` where ``rank`` counts earlier members only); query ``t`` attends to the
  members of its window at positions ``<= t``. Windows are not balanced (a cluster may own several
  windows, short ones are padded by repeating a member, unused window slots see no key), so at most
  ``min(N, (N + C (w - 1)) // w)`` windows of ``w`` are computed — about ``2 N w`` pairs.

* ``causal_safe=False, share_qk=False`` — keys are routed by their own scores (balanced top-w, as
  in the encoder) and the causal mask inside a window is by position, for layers whose keys and
  queries come from different projections (with shared windows a key's window follows the vector
  of the query at its position). Same selection leak as the paper's mode. On MQAR it stayed on the
  loss plateau where shared windows learned the task (README, MQAR).

Causal modes need self-attention (``Nq == Nk``). ``share_qk`` defaults to ``None``: shared windows
when causal (the paper's decoder), separate routing of queries and keys when not.

With RoPE: :class:`spattn.nn.Attention` routes on q and k *before* the rotation and attends with the
rotated ones (``selects_before_rope``; ``route_rotated=True`` clusters the rotated vectors). RoPE
turns each vector by an angle that grows with its position, so clustering rotated vectors groups
tokens by position as much as by content; dot products between queries and keys are unaffected,
which is why top-k needs no such care. On MQAR (``window(size=8); routing(clusters=2)``, RoPE)
routing on rotated vectors did not leave the loss plateau in 2,500 steps; on the vectors before
rotation it reached 99.16 % and 99.90 % in two of three seeds.

Used through a spec string (``spattn.attention(q, k, v, "routing(clusters=4)")``) a new pattern,
with new random centroids, is built per call; keep a :class:`Routing` instance (or use
:class:`spattn.nn.Attention` / :class:`spattn.nn.RoutingAttention`) to learn centroids.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layout import Layout
from ..registry import register
from ..selection import ClusterSelection
from ._padding import zero_padded
from .base import Pattern, check_float, check_int, check_qk

__all__ = ["Routing", "balanced_windows", "causal_safe_windows", "layer_norm"]

_SMOOTH_EPS = 1e-5
_INIT_ITERS = 10
_INSPECT_BLOCK = 64


def layer_norm(x: Tensor) -> Tensor:
    """Zero-mean, unit-variance over the last dim, no gain or bias (the paper's ``LayerNorm(scaling=False)``)."""
    return F.layer_norm(x, x.shape[-1:])


def balanced_windows(scores: Tensor, w: int, key_mask: Optional[Tensor] = None) -> Tensor:
    """Each centroid's top-``w`` tokens, sorted by position.

    ``scores [B, H, N, C]`` -> indices ``[B, H, C, w]``. ``key_mask [B, N]`` (True = real token)
    makes padded tokens the last choice (masked before the top-k).
    """
    s = scores.transpose(-1, -2)
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], -math.inf)
    return s.topk(w, dim=-1).indices.sort(dim=-1).values


def causal_safe_windows(scores: Tensor, w: int, real: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Causal-safe routing windows (see module docstring) from ``scores [B, H, N, C]``.

    ``real [B, N]`` (True = real token): padded tokens join no cluster and take no window slot.

    Returns ``(query_indices, key_indices)`` ``[B, H, W, w]`` with ``W = min(N, (N + C (w-1)) // w)``.
    Token ``t`` sits in window ``offset[c] + rank(t) // w`` of its nearest centroid ``c``; unused
    slots repeat the window's last member; unused windows get query 0 and key ``N - 1`` (no visible pair).
    """
    b, h, n, c = scores.shape
    assign = scores.argmax(-1)  # [B, H, N]
    onehot = F.one_hot(assign, c)
    if real is not None:
        onehot = onehot * real[:, None, :, None]
    rank = (onehot.cumsum(2) - 1).gather(-1, assign[..., None]).squeeze(-1)  # earlier members only
    per_cluster = onehot.sum(2)  # [B, H, C]
    windows_per_cluster = (per_cluster + w - 1) // w
    offset = windows_per_cluster.cumsum(-1) - windows_per_cluster
    n_windows = min(n, (n + c * (w - 1)) // w)
    window = offset.gather(-1, assign) + rank // w  # [B, H, N]
    slot = window * w + rank % w
    pos = torch.arange(n, device=scores.device).expand(b, h, n)
    if real is not None:  # padded tokens go to a spill slot past the windows
        slot = torch.where(real[:, None, :], slot, n_windows * w)
    flat = torch.full((b, h, n_windows * w + 1), -1, dtype=torch.long, device=scores.device)
    flat.scatter_(-1, slot, pos)
    idx = (
        flat[..., : n_windows * w].view(b, h, n_windows, w).cummax(-1).values
    )  # positions grow along a window: pad by repeating
    unused = idx < 0
    return idx.masked_fill(unused, 0), idx.masked_fill(unused, n - 1)


def _farthest_point_kmeans(x: Tensor, c: int, iters: int) -> Tensor:
    """k-means on ``x [H, M, D]`` by dot-product assignment: farthest-point seeds, ``iters`` Lloyd steps."""
    h, m, d = x.shape
    first = x[:, :1]
    centers = [first]
    dist = ((x - first) ** 2).sum(-1)
    for _ in range(1, c):
        nxt = x.gather(1, dist.argmax(-1)[:, None, None].expand(h, 1, d))
        centers.append(nxt)
        dist = torch.minimum(dist, ((x - nxt) ** 2).sum(-1))
    mu = torch.cat(centers, 1)
    for _ in range(iters):
        onehot = F.one_hot((x @ mu.transpose(1, 2)).argmax(-1), c).to(x.dtype)  # [H, M, C]
        count = onehot.sum(1)
        sums = onehot.transpose(1, 2) @ x
        mu = torch.where(count[..., None] > 0, sums / count.clamp(min=1)[..., None], mu)
    return mu


@register(
    "routing",
    kind="dynamic",
    description="Routing Transformer: per-head k-means centroids (EMA), balanced top-w windows, averaged outputs",
    paper="Roy, Saffar, Vaswani, Grangier 2021, Efficient Content-Based Sparse Attention with Routing Transformers (TACL)",
)
class Routing(Pattern, nn.Module):
    """k-means routing pattern with learned centroids (see module docstring).

    Args:
        clusters: C centroids per head (paper: 8 for Wikitext-103 at 4k, 16 for enwik8 at 8k).
        window: tokens per window ``w``; default ``ceil(N / C)``.
        causal_safe: with ``causal=True``, the variant whose selection never looks at future tokens
            (False = the paper's shared-QK balanced routing).
        share_qk: keys use the query windows (needs ``Nq == Nk``); ``False`` routes keys by their own
            scores; ``None`` (default) = shared when causal, separate when not.
        decay: EMA decay lambda of the k-means statistics (paper 0.999).
        commitment: weight beta of the commitment loss (paper 1e-4).
        init: ``"data"`` (k-means on the first training batch) or ``"random"`` (the paper's ``LN(randn)``).
        revive: a centroid nearest to fewer than ``revive`` × its even share (``1 / C``) of a training
            batch's routed vectors is dead: it is moved onto the batch vector farthest from its own
            nearest centroid, with an even share of the EMA count (k-means' usual restart of empty
            clusters; 0 = never, the paper). A dead centroid still takes its top-w tokens, which
            then have no content in common, and balanced windows leave other tokens in no window.
        route_rotated: in a layer with RoPE, cluster the rotated q / k (positions then shape the
            windows as much as content does) instead of the vectors before rotation (default).
        heads, head_dim: create the centroids now (``[heads, C, head_dim]``); otherwise on the first call.

    Buffers (saved by ``state_dict``): ``centroids [H, C, D]``, ``ema_count [H, C]``, ``ema_sum [H, C, D]``,
    ``initialized`` (bool scalar).
    """

    name = "routing"
    content_based = True

    def __init__(
        self,
        clusters: int = 8,
        window: Optional[int] = None,
        causal_safe: bool = False,
        share_qk: Optional[bool] = None,
        decay: float = 0.999,
        commitment: float = 1e-4,
        init: str = "data",
        revive: float = 0.0,
        route_rotated: bool = False,
        heads: Optional[int] = None,
        head_dim: Optional[int] = None,
    ):
        nn.Module.__init__(self)
        check_int("routing", "clusters", clusters, 1)
        check_int("routing", "window", window, 1, allow_none=True)
        if not isinstance(causal_safe, bool):
            raise TypeError(f"routing: causal_safe must be a bool, got {causal_safe!r}")
        if share_qk is not None and not isinstance(share_qk, bool):
            raise TypeError(f"routing: share_qk must be a bool or None, got {share_qk!r}")
        if causal_safe and share_qk is False:
            raise ValueError(
                "routing: causal_safe=True routes each token's query and key together; "
                "share_qk=False is not supported with it"
            )
        check_float("routing", "decay", decay, 0.0, 1.0, low_open=True, high_open=True)
        check_float("routing", "commitment", commitment, 0.0, math.inf)
        if init not in ("data", "random"):
            raise ValueError(f"routing: init must be 'data' or 'random', got {init!r}")
        check_int("routing", "heads", heads, 1, allow_none=True)
        check_int("routing", "head_dim", head_dim, 1, allow_none=True)
        if (heads is None) != (head_dim is None):
            raise ValueError("routing: give both heads and head_dim (to create the centroids now) or neither")
        self.clusters, self.window, self.causal_safe, self.share_qk = clusters, window, causal_safe, share_qk
        self.decay, self.commitment, self.init = float(decay), float(commitment), init
        check_float("routing", "revive", revive, 0.0, 1.0)
        self.revive = float(revive)
        if not isinstance(route_rotated, bool):
            raise TypeError(f"routing: route_rotated must be a bool, got {route_rotated!r}")
        self.heads, self.head_dim, self.route_rotated = heads, head_dim, route_rotated
        for buf in ("centroids", "ema_count", "ema_sum", "initialized"):
            self.register_buffer(buf, None)
        self.aux_loss: Tensor = torch.zeros(())
        if heads is not None:
            self._create(heads, head_dim, torch.device("cpu"))

    @property
    def selects_before_rope(self) -> bool:
        return not self.route_rotated

    # ------------------------------------------------------------------ state
    def _create(self, heads: int, head_dim: int, device) -> None:
        self.centroids = layer_norm(torch.randn(heads, self.clusters, head_dim, device=device))
        self.ema_count = torch.ones(heads, self.clusters, device=device)
        self.ema_sum = self.centroids.clone()
        self.initialized = torch.tensor(self.init == "random", device=device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "centroids"
        if self.centroids is None and key in state_dict:  # lazily created: take the saved shape
            h, _, d = state_dict[key].shape
            self._create(h, d, state_dict[key].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_state(self, hq: int, d: int, device) -> None:
        if self.centroids is None:
            self._create(hq, d, device)
        h, _, dc = self.centroids.shape
        if (h, dc) != (hq, d):
            raise ValueError(f"routing: centroids are for {h} heads of dim {dc} but q has {hq} heads of dim {d}")
        if self.centroids.device != device:
            raise ValueError(f"routing: centroids are on {self.centroids.device} but q is on {device}; move the module")

    # ------------------------------------------------------------------ routing
    def _window_size(self, n: int) -> int:
        w = self.window if self.window is not None else -(-n // self.clusters)
        if w > n:
            raise ValueError(f"routing: window={w} exceeds the sequence length {n}")
        return w

    def _check_lengths(self, nq: int, nk: int, causal: bool) -> None:
        if self.clusters > min(nq, nk):
            raise ValueError(f"routing: clusters={self.clusters} must be <= the sequence length (Nq={nq}, Nk={nk})")
        if (causal or self._shares(causal)) and nq != nk:
            why = "causal=True" if causal else "share_qk=True"
            raise ValueError(
                f"routing: {why} shares windows between queries and keys and needs Nq == Nk, got {nq}, {nk}"
            )

    def _shares(self, causal: bool) -> bool:
        """Do keys use the query windows? (``share_qk``; ``None`` = shared when causal.)"""
        return causal if self.share_qk is None else self.share_qk

    def _scores(self, x: Tensor, hq: int) -> Tensor:
        """``x [B, Hx, N, D]`` (Hx divides Hq) -> scores ``[B, Hq, N, C]`` against each query head's centroids."""
        b, hx, n, d = x.shape
        mu = self.centroids.to(x.dtype).view(hx, hq // hx, self.clusters, d)
        return torch.einsum("bhnd,hgcd->bhgnc", x, mu).reshape(b, hq, n, self.clusters)

    def _route(self, q: Tensor, k: Tensor, causal: bool, key_padding_mask: Optional[Tensor]):
        """Returns (selection, routed vectors with grad, their scores, their validity masks)."""
        b, hq, hkv, nq, nk = check_qk(q, k)
        if not isinstance(causal, bool):
            raise TypeError(f"routing: causal must be a bool, got {causal!r}")
        self._check_lengths(nq, nk, causal)
        self._check_state(hq, q.shape[-1], q.device)
        if key_padding_mask is not None and (
            key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, nk)
        ):
            raise ValueError(f"routing: key_padding_mask must be a bool tensor of shape {(b, nk)}")
        # padded tokens take no part: values zeroed, no window slot while real tokens remain, no
        # k-means statistics; in self-attention (Nq == Nk) the key mask also marks padded queries
        qmask = key_padding_mask if nq == nk else None
        q, k = zero_padded(q, qmask), zero_padded(k, key_padding_mask)
        dtype = torch.promote_types(q.dtype, torch.float32)  # score in at least fp32
        xq = layer_norm(q.to(dtype))
        sq = self._scores(xq.detach(), hq)
        shared = self._shares(causal)
        if causal and self.causal_safe:
            qi, ki = causal_safe_windows(sq, self._window_size(nq), qmask)
        elif shared:
            qi = ki = balanced_windows(sq, self._window_size(nq), key_padding_mask)
        else:
            qi = balanced_windows(sq, self._window_size(nq), qmask)
        routed, scores = [xq], [sq]
        masks = [qmask]
        if not shared:
            xk = layer_norm(k.to(dtype))
            sk = self._scores(xk.detach(), hq)
            ki = balanced_windows(sk, self._window_size(nk), key_padding_mask)
            routed.append(xk)
            scores.append(sk)
            masks.append(key_padding_mask)
        sel = ClusterSelection(qi, ki, nq, nk, causal=causal)
        return sel, routed, scores, masks

    def select(
        self, q: Tensor, k: Tensor, causal: bool = False, *, key_padding_mask: Optional[Tensor] = None, state=None
    ) -> ClusterSelection:
        """Routing windows for ``q [B, Hq, Nq, D]``, ``k [B, Hkv, Nk, D]``.

        Sets :attr:`aux_loss` (commitment loss, grad to q and k) and, in training mode, updates the
        centroids after choosing the windows. ``key_padding_mask [B, Nk]`` (True = real token) keeps
        padded keys out of windows where possible and out of the k-means statistics.
        """
        sel, routed, scores, masks = self._route(q, k, causal, key_padding_mask)
        hq = q.shape[1]
        mu = self.centroids
        loss = q.new_zeros((), dtype=routed[0].dtype)
        total = 0
        stats = []
        for x, s, m in zip(routed, scores, masks):
            assign = s.argmax(-1)  # [B, Hq, N]
            hx = x.shape[1]
            xe = x.repeat_interleave(hq // hx, dim=1) if hx != hq else x  # per query head
            target = mu.to(x.dtype)[torch.arange(hq, device=x.device)[None, :, None], assign]
            err = ((xe - target) ** 2).mean(-1)
            weight = torch.ones_like(err) if m is None else m[:, None, :].to(err.dtype).expand_as(err)
            loss = loss + (err * weight).sum()
            total = total + weight.sum()
            stats.append((xe.detach(), weight))
        self.aux_loss = self.commitment * loss / total.clamp(min=1)
        if self.training:
            self._ema_update(stats)
        return sel

    @torch.no_grad()
    def _ema_update(self, stats) -> None:
        h, c, d = self.centroids.shape
        if not bool(self.initialized):
            x = _routed_rows(stats)
            if x.shape[1] >= c:
                mu = _farthest_point_kmeans(x.float(), c, _INIT_ITERS)
                self.centroids.copy_(mu)
                self.ema_sum.copy_(mu)
                self.ema_count.fill_(1.0)
                self.initialized.fill_(True)
        count = torch.zeros(h, c, device=self.centroids.device)
        dw = torch.zeros(h, c, d, device=self.centroids.device)
        for xe, weight in stats:
            assign = torch.einsum("bhnd,hcd->bhnc", xe, self.centroids.to(xe.dtype)).argmax(-1)  # after a data init too
            onehot = F.one_hot(assign, c).float() * weight[..., None].float()  # [B, H, N, C]
            count += onehot.sum((0, 2))
            dw += torch.einsum("bhnc,bhnd->hcd", onehot, xe.float())
        lam = self.decay
        self.ema_count.mul_(lam).add_(count, alpha=1 - lam)
        self.ema_sum.mul_(lam).add_(dw, alpha=1 - lam)
        n = self.ema_count.sum(-1, keepdim=True)
        smoothed = (self.ema_count + _SMOOTH_EPS) / (n + c * _SMOOTH_EPS) * n
        self.centroids.copy_(self.ema_sum / smoothed[..., None])
        if self.revive > 0:
            self._revive_dead(count < self.revive * count.sum(-1, keepdim=True) / c, stats)

    @torch.no_grad()
    def _revive_dead(self, dead: Tensor, stats) -> None:
        """Move each dead centroid (``dead [H, C]``) onto a batch vector far from every centroid."""
        if not bool(dead.any()):
            return
        h, c, d = self.centroids.shape
        x = _routed_rows(stats).float()  # [H, M, D]
        mu = self.centroids.float()
        nearest = mu.gather(1, (x @ mu.transpose(1, 2)).argmax(-1)[..., None].expand(-1, -1, d))
        farthest_first = ((x - nearest) ** 2).sum(-1).argsort(dim=1, descending=True, stable=True)  # [H, M]
        for head in range(h):
            slots = dead[head].nonzero().flatten()[: x.shape[1]]
            if slots.numel() == 0:
                continue
            picked = x[head, farthest_first[head, : slots.numel()]].to(self.centroids.dtype)
            share = self.ema_count[head].sum() / c
            self.centroids[head, slots] = picked
            self.ema_count[head, slots] = share
            self.ema_sum[head, slots] = picked * share

    def layout(self, q: Tensor, k: Tensor, causal: bool = False) -> Layout:
        """For inspection only: the pairs of :meth:`select` as a Layout (builds ``Nq × Nk``: O(N²)).

        Does not update the centroids. Note a Layout runs softmax over the *union* of a query's
        windows, while routing averages per-window outputs: run attention on :meth:`select`.
        """
        with torch.no_grad():
            sel = self._route(q, k, causal, None)[0]
        return Layout.from_dense(sel.to_dense(), _INSPECT_BLOCK)


def _routed_rows(stats) -> Tensor:
    """The batch's routed vectors with nonzero weight, queries then keys: ``[H, M, D]``."""
    return torch.cat([_valid_rows(xe, w) for xe, w in stats], 1)


def _valid_rows(x: Tensor, weight: Tensor) -> Tensor:
    """``x [B, H, N, D]`` -> ``[H, M, D]``: the vectors with nonzero weight (same count in every head)."""
    b, h, n, d = x.shape
    keep = weight[:, 0, :].bool()  # [B, N]: padding does not depend on the head
    return x.permute(1, 0, 2, 3)[:, keep]
