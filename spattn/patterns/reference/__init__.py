"""Brute-force references of the patterns: the paper's (query, key) pairs built with plain loops and
dense NumPy / torch, the oracles the pattern tests compare against.

They are independent of the code they check: modules here import only torch, NumPy and each other,
never a pattern module (``tests/test_architecture.py`` holds them to it). Slow by design; for small
inputs only. Query ``i`` of ``Nq`` sits at key position ``i' = i + Nk - Nq``; shapes ``q [B, Hq, Nq, D]``,
``k [B, Hkv, Nk, D]`` (GQA: query head ``h`` reads kv head ``h // (Hq / Hkv)``).

- :mod:`.static`: the position-only patterns (dense, window, dilated, global, strided, fixed, axial,
  A-shape, BigBird, neighbourhood);
- :mod:`.content`: top-k, top-p, block top-k / block mass, BiFormer, SeerAttention;
- :mod:`.prefill`: XAttention, MInference (vertical-slash, block), FlexPrefill;
- :mod:`.decode`: Quest, Double Sparsity, TidalDecode, page selections;
- :mod:`.routing`: the Routing Transformer's centroid windows.
"""

from ._grid import block_geometry, causal_dense, expand_blocks, full_probs, np_heads, pick, positions, visible
from .content import (
    brute_biformer,
    brute_block_mass,
    brute_block_topk,
    brute_seer_block_map,
    brute_seer_logits,
    brute_topk,
    brute_topp,
    token_blocks,
)
from .decode import (
    brute_budget_rows,
    brute_double_sparsity_group_scores,
    brute_double_sparsity_scores,
    brute_group_label_scores,
    brute_page_dense,
    brute_quest_rows,
    brute_scores,
    last_visible,
    quest_evaluation_oracle,
    quest_kernel_oracle,
    quest_token_bounds,
)
from .prefill import (
    brute_flexprefill_blocks,
    brute_minference_block,
    brute_vertical_slash,
    brute_vertical_slash_scores,
    brute_vertical_slash_tiles,
    official_find_blocks,
    official_slash_blocks,
    xattn_brute_scores,
    xattn_brute_select,
)
from .routing import brute_routing_causal_safe, brute_routing_scores, brute_routing_windows
from .static import (
    axis_neighbours,
    brute_a_shape,
    brute_axial,
    brute_bigbird,
    brute_dense,
    brute_dilated_window,
    brute_fixed,
    brute_global_tokens,
    brute_strided,
    brute_window,
    nat_1d,
    nat_2d,
)

__all__ = [
    "axis_neighbours",
    "block_geometry",
    "brute_a_shape",
    "brute_axial",
    "brute_bigbird",
    "brute_biformer",
    "brute_block_mass",
    "brute_block_topk",
    "brute_budget_rows",
    "brute_dense",
    "brute_double_sparsity_group_scores",
    "brute_double_sparsity_scores",
    "brute_dilated_window",
    "brute_fixed",
    "brute_flexprefill_blocks",
    "brute_global_tokens",
    "brute_group_label_scores",
    "brute_minference_block",
    "brute_page_dense",
    "brute_quest_rows",
    "brute_routing_causal_safe",
    "brute_routing_scores",
    "brute_routing_windows",
    "brute_seer_block_map",
    "brute_seer_logits",
    "brute_scores",
    "brute_strided",
    "brute_topk",
    "brute_topp",
    "brute_vertical_slash",
    "brute_vertical_slash_scores",
    "brute_vertical_slash_tiles",
    "brute_window",
    "causal_dense",
    "expand_blocks",
    "full_probs",
    "last_visible",
    "nat_1d",
    "nat_2d",
    "np_heads",
    "official_find_blocks",
    "official_slash_blocks",
    "pick",
    "positions",
    "quest_evaluation_oracle",
    "quest_kernel_oracle",
    "quest_token_bounds",
    "token_blocks",
    "visible",
    "xattn_brute_scores",
    "xattn_brute_select",
]
