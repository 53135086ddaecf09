"""NaN in, NaN out — exactly where the dense reference puts it, whatever a kernel's tiling.

In the reference (``kernels/reference.py``) a row's output depends only on its own query and the
keys / values it may see: a NaN in query ``i`` makes row ``i`` NaN (when it sees any key), a NaN
anywhere in key ``j`` makes every row that sees ``j`` NaN (its score is NaN), a NaN in value element
``v[j, c]`` makes column ``c`` NaN in exactly the rows that see ``j``. A tiled kernel cannot honour
that by itself: it computes scores for whole tiles and masks them afterwards (``NaN + -inf`` is NaN),
and multiplies excluded values by a zero probability (``0 · NaN`` is NaN), so one NaN leaks into
every row of its tiles.

:func:`nan_exact` therefore runs the kernel on inputs with the NaN entries zeroed, then asks the
*same* kernel (same selection, same key padding) which rows see which NaN: with ``q = k = 0`` every
allowed key of a row gets probability ``1 / (keys it sees) > 0``, so attending to an indicator value
(1 at a NaN position, 0 elsewhere) is positive exactly where the row sees one. The rows and columns
found are set to NaN. Inputs without NaN (the normal case) cost one sum per tensor (or, for a kernel
that never hides a NaN, one sum over its output).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

Result = Union[Tensor, tuple[Tensor, Tensor]]


def nan_exact(
    run: Callable[[Tensor, Tensor, Tensor], Result],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probe: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None,
    shows_nan: bool = False,
) -> Result:
    """``run(q, k, v)`` (-> ``out`` or ``(out, lse)``) with the reference's NaN propagation.

    ``probe(q, k, v) -> out`` attends with the same selection as ``run`` (default: ``run``'s output);
    it is called only when an input holds a NaN. ``shows_nan``: ``run`` never hides a NaN a row can see
    (it may spread one too far, never too little), so a NaN-free output proves that no input NaN
    reached any row: ``run`` is then called first and only its output is checked (one pass over
    ``out`` instead of over q, k and v). Shapes: q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``,
    v ``[B, Hkv, Nk, Dv]``.
    """
    plain = None  # run's result on the inputs as they are, once computed
    if shows_nan:
        plain = run(q, k, v)
        if not _may_hold_nan(*(t.detach() for t in (plain if isinstance(plain, tuple) else (plain,)))):
            return plain
    elif not _may_hold_nan(q, k, v):
        return run(q, k, v)
    q_nan, k_nan, v_nan = torch.isnan(q).any(-1), torch.isnan(k).any(-1), torch.isnan(v)
    if not (bool(q_nan.any()) or bool(k_nan.any()) or bool(v_nan.any())):
        return run(q, k, v) if plain is None else plain  # a false alarm (e.g. inf - inf): no NaN input
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    result = run(
        torch.where(q_nan[..., None], zero, q), torch.where(k_nan[..., None], zero, k), torch.where(v_nan, zero, v)
    )
    out, lse = result if isinstance(result, tuple) else (result, None)
    dv = v.shape[-1]
    indicators = torch.cat([v_nan, k_nan[..., None], torch.ones_like(k_nan[..., None])], -1).to(v.dtype)
    # probed in slices of v's own width, so the kernel sees exactly the shapes of the real call
    indicators = torch.nn.functional.pad(indicators, (0, -(dv + 2) % dv))
    probe = probe or (lambda *a: _first(run(*a)))
    q0, k0 = torch.zeros_like(q), torch.zeros_like(k)
    with torch.no_grad():
        seen = torch.cat([probe(q0, k0, part) for part in indicators.split(dv, -1)], -1)
    sees_any = seen[..., dv + 1] > 0
    row_nan = (seen[..., dv] > 0) | (q_nan & sees_any)  # [B, Hq, Nq]
    nan = torch.tensor(float("nan"), dtype=out.dtype, device=out.device)
    out = torch.where(row_nan[..., None] | (seen[..., :dv] > 0), nan, out)
    if lse is None:
        return out
    return out, torch.where(row_nan, torch.tensor(float("nan"), dtype=lse.dtype, device=lse.device), lse)


def _may_hold_nan(*tensors: Tensor) -> bool:
    """False only when no tensor holds a NaN: a NaN makes the sum NaN; the sum of NaN-free values is
    NaN only through overflow to both infinities (a false alarm, sorted out by the exact test). One
    reduction pass per tensor without the full-size boolean temporary of ``isnan``."""
    return any(bool(torch.isnan(t.sum())) for t in tensors)


def _first(result: Result) -> Tensor:
    return result[0] if isinstance(result, tuple) else result
