"""A small KV cache with the side information decode-time selectors keep next to it.

Decode-time selection (Quest, Double Sparsity, TidalDecode) scores a long key cache once per
generated token. Recomputing per-page statistics or label caches from the whole cache each step
would cost as much as dense attention, so selectors keep *incremental* summaries that only touch
the keys appended since the previous step:

* :class:`PageSummary` — Quest's per-page elementwise ``max``/``min`` of the keys (Tang et al. 2024).
* :class:`LabelCache` — Double Sparsity's keys restricted to a few calibrated channels (Yang et al. 2024).
* :class:`SelectorState` — one dict of such objects per layer plus a dict shared by all layers
  (TidalDecode's token positions selected at one layer and reused by the following ones).
* :class:`LayerState` — one layer's handle on a :class:`SelectorState` (``state.at(layer)``): what a
  decode-time selector's ``select(q, k, causal=..., state=...)`` takes.
* :class:`KVCache` — an append-only per-layer key/value store owning a :class:`SelectorState`,
  for decoding loops outside Hugging Face; the HF integration keeps transformers' own cache and
  attaches a :class:`SelectorState` next to it.

Summaries assume the cache only grows by appending (the keys of positions ``< length`` never
change). A call whose key tensor is shorter than what was summarised, or whose batch / head /
channel shape differs, rebuilds the summary from scratch; so does :meth:`SelectorState.reset`,
which the integration calls at every prefill.

Same layer as :mod:`spattn.layout`: imports nothing from spattn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ._checks import int_at_least, is_int

__all__ = ["PageSummary", "LabelCache", "SelectorState", "LayerState", "KVCache"]


def _check_keys(owner: str, keys: Tensor, name: str = "keys") -> None:
    if not isinstance(keys, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor [B, Hkv, N, D], got {type(keys).__name__}")
    if keys.dim() != 4:
        raise ValueError(f"{owner}: {name} must have shape [B, Hkv, N, D], got {tuple(keys.shape)}")
    if not keys.is_floating_point():
        raise TypeError(f"{owner}: {name} must be a floating-point tensor, got {keys.dtype}")


def _check_layer(layer: Any) -> None:
    if not is_int(layer):
        raise TypeError(f"KVCache: layer must be an int index, got {layer!r}")


class _Growing:
    """A tensor that grows along one dim (default 2) in amortised O(appended): storage doubles when
    full, and :attr:`data` is a view of the filled part (appending never copies what is stored)."""

    def __init__(self, first: Tensor, dim: int = 2):
        self._buf = first.contiguous()
        self.dim = dim
        self.length = first.shape[dim]

    @property
    def data(self) -> Tensor:
        return self._buf.narrow(self.dim, 0, self.length)

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def append(self, x: Tensor) -> Tensor:
        need = self.length + x.shape[self.dim]
        if need > self._buf.shape[self.dim]:
            shape = list(self._buf.shape)
            shape[self.dim] = max(need, 2 * self._buf.shape[self.dim])
            buf = self._buf.new_empty(shape)
            buf.narrow(self.dim, 0, self.length).copy_(self.data)
            self._buf = buf
        self._buf.narrow(self.dim, self.length, need - self.length).copy_(x)
        self.length = need
        return self.data


class PageSummary:
    """Per-page elementwise key bounds of a growing key cache (Quest, Tang et al. ICML 2024).

    Pages are ``page`` consecutive positions; page ``p`` covers ``[p*page, (p+1)*page)``, the last
    one possibly partial. After :meth:`update` with keys ``[B, Hkv, N, D]``:
    ``kmax[b, h, p, d] = max_t keys[b, h, t, d]`` and ``kmin`` likewise over the tokens of page ``p``;
    both ``[B, Hkv, ceil(N/page), D]`` in the keys' dtype, stored side by side as
    ``bounds = [kmax | kmin]`` (``[..., 2D]``: one matmul scores both). Only pages touched by new
    tokens are recomputed.
    """

    def __init__(self, page: int):
        self.page = int_at_least("PageSummary: page", page)
        self.length = 0
        self._bounds: Optional[_Growing] = None

    @property
    def bounds(self) -> Optional[Tensor]:
        """``[B, Hkv, P, 2D]``: ``kmax`` then ``kmin`` along the last dim."""
        return None if self._bounds is None else self._bounds.data

    @property
    def kmax(self) -> Optional[Tensor]:
        return None if self._bounds is None else self.bounds[..., : self.bounds.shape[-1] // 2]

    @property
    def kmin(self) -> Optional[Tensor]:
        return None if self._bounds is None else self.bounds[..., self.bounds.shape[-1] // 2 :]

    def _page_bounds(self, keys: Tensor) -> Tensor:
        """``[kmax | kmin]`` of ``keys`` whose first token starts a page."""
        b, h, n, d = keys.shape
        if n <= self.page:  # one (partial) page: the common decoding step
            return torch.cat([keys.amax(dim=2, keepdim=True), keys.amin(dim=2, keepdim=True)], dim=-1)
        pages = -(-n // self.page)
        pad = pages * self.page - n
        if pad:
            # repeat the last key: it changes neither the max nor the min of its page
            keys = torch.cat([keys, keys[:, :, -1:].expand(b, h, pad, d)], dim=2)
        tiles = keys.view(b, h, pages, self.page, d)
        return torch.cat([tiles.amax(dim=3), tiles.amin(dim=3)], dim=-1)

    def update(self, keys: Tensor) -> "PageSummary":
        """Bring the bounds up to date with the whole key cache ``keys [B, Hkv, N, D]``."""
        _check_keys("PageSummary", keys)
        n = keys.shape[2]
        bounds = self.bounds
        stale = (
            bounds is None
            or n < self.length
            or bounds.shape[:2] != keys.shape[:2]
            or bounds.shape[3] != 2 * keys.shape[3]
            or bounds.dtype != keys.dtype
            or bounds.device != keys.device
        )
        if stale:
            self._bounds = _Growing(self._page_bounds(keys))
        elif n > self.length:
            first = self.length // self.page  # first page with new tokens: recomputed, then appended
            self._bounds.truncate(first)
            self._bounds.append(self._page_bounds(keys[:, :, first * self.page :]))
        self.length = n
        return self


class LabelCache:
    """Keys restricted to per-query-head channels (Double Sparsity's "label cache", Yang et al. 2024).

    ``channels [Hq, r]`` int64: the channels kept for each query head; query head ``h`` reads the
    keys of kv head ``h // (Hq / Hkv)``. After :meth:`update` with keys ``[B, Hkv, N, D]``,
    ``labels [B, Hq, N, r]`` holds ``keys[b, h // G, t, channels[h]]``; new positions are appended.
    (``channels`` may also hold one row per kv head, shared by its query heads: then ``Hq = Hkv``.)
    ``dtype`` stores the labels in another precision than the keys (Double Sparsity keeps 16-bit or
    4-bit labels: they only rank tokens), None = the keys' dtype.
    Storage is channel-major (:attr:`labels_by_channel`, ``[B, Hq, r, N]`` with unit stride along
    tokens; ``labels`` is its transposed view): scoring one query against N labels is then a product
    with contiguous rows of N, which a CPU GEMM runs about twice as fast as N rows of r.
    """

    def __init__(self, channels: Tensor, dtype: Optional[torch.dtype] = None):
        if not isinstance(channels, Tensor) or channels.dtype != torch.long or channels.dim() != 2:
            got = (
                f"{channels.dtype} {tuple(channels.shape)}" if isinstance(channels, Tensor) else type(channels).__name__
            )
            raise TypeError(f"LabelCache: channels must be an int64 tensor [Hq, r], got {got}")
        if channels.numel() and int(channels.min()) < 0:
            raise ValueError(f"LabelCache: channel indices must be >= 0, got {int(channels.min())}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(
                f"LabelCache: dtype must be a floating torch.dtype or None (the keys' dtype), got {dtype!r}"
            )
        self.channels = channels
        self.dtype = dtype
        self.length = 0
        self._max_channel = int(channels.max()) if channels.numel() else -1  # checked against D once per call
        self._index: Optional[Tensor] = None  # channels on the keys' device, [1, Hq, 1, r]
        self._labels: Optional[_Growing] = None

    @property
    def labels(self) -> Optional[Tensor]:
        """``[B, Hq, N, r]`` (a transposed view of :attr:`labels_by_channel`)."""
        return None if self._labels is None else self._labels.data.transpose(2, 3)

    @property
    def labels_by_channel(self) -> Optional[Tensor]:
        """``[B, Hq, r, N]``, unit stride along N."""
        return None if self._labels is None else self._labels.data

    def _gather(self, keys: Tensor) -> Tensor:
        """``keys [B, Hkv, n, D]`` -> channel-major labels ``[B, Hq, r, n]``."""
        b, hkv, n, d = keys.shape
        hq, r = self.channels.shape
        if hq % hkv:
            raise ValueError(
                f"LabelCache: {hq} query heads of channels is not a multiple of the {hkv} kv heads of keys"
            )
        if self._max_channel >= d:
            raise ValueError(f"LabelCache: channel index {self._max_channel} out of range for head dim {d}")
        group = hq // hkv
        per_head = keys.repeat_interleave(group, dim=1) if group > 1 else keys  # [B, Hq, n, D]
        if self._index is None or self._index.device != keys.device:
            self._index = self.channels.to(keys.device)[None, :, None, :]
        labels = torch.gather(per_head, 3, self._index.expand(b, hq, n, r))
        return labels.to(self.dtype or keys.dtype).transpose(2, 3)

    def update(self, keys: Tensor) -> "LabelCache":
        """Bring the labels up to date with the whole key cache ``keys [B, Hkv, N, D]``."""
        _check_keys("LabelCache", keys)
        n = keys.shape[2]
        stored = None if self._labels is None else self._labels.data
        stale = (
            stored is None
            or n < self.length
            or stored.shape[0] != keys.shape[0]
            or stored.dtype != (self.dtype or keys.dtype)
            or stored.device != keys.device
        )
        if stale:
            self._labels = _Growing(self._gather(keys), dim=3)
        elif n > self.length:
            self._labels.append(self._gather(keys[:, :, self.length :]))
        self.length = n
        return self


class SelectorState:
    """Side information of decode-time selectors: a dict per layer and one shared by all layers.

    ``state.layer(i)`` is layer ``i``'s dict (e.g. ``{"quest": PageSummary}``); ``state.shared``
    carries cross-layer information (TidalDecode's latest selected positions). ``reset()`` forgets
    everything (a new sequence starts).
    """

    def __init__(self):
        self.layers: dict[Any, dict[str, Any]] = {}
        self.shared: dict[str, Any] = {}

    def layer(self, index: Any) -> dict[str, Any]:
        return self.layers.setdefault(index, {})

    def at(self, layer: Any) -> "LayerState":
        """Layer ``layer``'s handle, for ``selector.select(q, k, causal=..., state=state.at(layer))``."""
        return LayerState(self, layer)

    def reset(self) -> None:
        self.layers.clear()
        self.shared.clear()


@dataclass(frozen=True)
class LayerState:
    """The ``state=`` of a decode-time selector's ``select``: which layer is selecting (``layer``) and
    the :class:`SelectorState` holding the incremental summaries (``store``; None keeps none, and
    every call summarises the keys from scratch -- e.g. Double Sparsity's per-layer calibration
    without a cache: ``LayerState(None, 3)``)."""

    store: Optional[SelectorState]
    layer: Any

    def __post_init__(self):
        if self.store is not None and not isinstance(self.store, SelectorState):
            raise TypeError(f"LayerState: store must be a SelectorState or None, got {type(self.store).__name__}")


class KVCache:
    """Append-only per-layer key/value cache for a decoding loop, with a :class:`SelectorState`.

    ``k, v = cache.update(layer, k_new, v_new)`` appends ``[B, Hkv, n, D]`` and returns the layer's
    whole cache ``[B, Hkv, N, D]`` (the interface of transformers' ``Cache.update``).
    """

    def __init__(self):
        self._keys: dict[int, _Growing] = {}
        self._values: dict[int, _Growing] = {}
        self.state = SelectorState()

    @property
    def keys(self) -> dict[int, Tensor]:
        return {layer: buf.data for layer, buf in self._keys.items()}

    @property
    def values(self) -> dict[int, Tensor]:
        return {layer: buf.data for layer, buf in self._values.items()}

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        _check_layer(layer)
        _check_keys("KVCache", k, "k")
        _check_keys("KVCache", v, "v")
        if k.shape != v.shape:
            raise ValueError(f"KVCache: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.dtype != v.dtype or k.device != v.device:
            raise ValueError(
                f"KVCache: k and v must share dtype and device, got {k.dtype} on {k.device} and {v.dtype} on {v.device}"
            )
        if layer in self._keys:
            old = self._keys[layer].data
            if old.shape[:2] != k.shape[:2] or old.shape[3] != k.shape[3] or old.dtype != k.dtype:
                raise ValueError(
                    f"KVCache: layer {layer} holds [B, Hkv, N, D] = {tuple(old.shape)} {old.dtype}; "
                    f"cannot append {tuple(k.shape)} {k.dtype}"
                )
            return self._keys[layer].append(k), self._values[layer].append(v)
        self._keys[layer], self._values[layer] = _Growing(k), _Growing(v)
        return self._keys[layer].data, self._values[layer].data

    def length(self, layer: int = 0) -> int:
        _check_layer(layer)
        return self._keys[layer].length if layer in self._keys else 0

    def reset(self) -> None:
        self._keys.clear()
        self._values.clear()
        self.state.reset()
