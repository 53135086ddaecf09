"""Do routing windows put MQAR queries together with their answers? (README, MQAR section)

For a causal LM on MQAR whose layers include ``routing(...)``, runs one batch and reports, for the
query positions, how often the position holding the matching value shares a routing window (of the
last routing layer) with the query, and how often the query falls in no window (its output is
zeros). With ``--checkpoint`` the weights (and centroids) of a ``spattn train mqar`` run are loaded,
else the model is freshly initialised. Example::

    python benchmarks/mqar_routing_windows.py --attention "window(size=8); routing(clusters=2)"
    python benchmarks/mqar_routing_windows.py --checkpoint runs/mqar_win_routing2/checkpoint.pt
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from spattn.bench.train import load_checkpoint  # noqa: E402
from spattn.data.mqar import generate  # noqa: E402
from spattn.models.builder import ModelConfig, build_model  # noqa: E402
from spattn.patterns.routing import Routing  # noqa: E402


def window_stats(model, inputs: torch.Tensor, targets: torch.Tensor, kv_pairs: int) -> tuple[float, float]:
    """(fraction of queries sharing a window with their value position, fraction in no window)."""
    captured = []
    select = Routing.select

    def recording(self, q, k, causal=False, **kw):
        captured.append(select(self, q, k, causal, **kw))
        return captured[-1]

    Routing.select = recording
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        Routing.select = select
    if not captured:
        raise SystemExit("the model has no routing layer")
    windows = captured[-1].query_indices  # [B, H, C, w] positions per window (last routing layer, head 0)
    shared = alone = total = 0
    for b in range(inputs.shape[0]):
        keys = inputs[b, : 2 * kv_pairs : 2]
        for t in (targets[b] >= 0).nonzero().flatten().tolist():
            value_pos = 2 * int((keys == inputs[b, t]).nonzero()[0]) + 1
            member = (windows[b, 0] == t).any(-1)  # [C]: windows holding the query
            total += 1
            alone += not bool(member.any())
            shared += bool((windows[b, 0][member] == value_pos).any())
    return shared / total, alone / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attention", help="spec of a fresh model (ignored with --checkpoint)")
    ap.add_argument("--checkpoint", help="checkpoint.pt of a `spattn train mqar` run")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        config = ModelConfig.from_dict(ckpt["model_config"])
    elif args.attention:
        ckpt = None
        config = ModelConfig(kind="lm", vocab_size=8192, num_classes=8192, dim=64, depth=2, heads=1, max_len=256,
                             positions="rope", mlp_ratio=0.0, attention=args.attention)
    else:
        raise SystemExit("give --attention or --checkpoint")
    torch.manual_seed(args.seed)
    model = build_model(config).eval()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    kv_pairs = 16
    x, y = generate(np.random.default_rng(args.seed), args.examples, config.max_len, kv_pairs, config.vocab_size)
    shared, alone = window_stats(model, torch.from_numpy(x), torch.from_numpy(y), kv_pairs)
    print(f"{config.attention}: value position in the query's window for {shared:.1%} of queries; "
          f"query in no window: {alone:.1%}")


if __name__ == "__main__":
    main()
