"""Do routing windows put MQAR queries together with their answers? (README, MQAR section)

For a causal LM on MQAR whose layers include ``routing(...)``, runs one batch and reports, for the
query positions, how often the position holding the matching value shares a routing window (of the
last routing layer) with the query, and how often the query falls in no window (its output is
zeros), then the accuracy on queries with and without their answer in the window and how often the
answer is nearest to the query's centroid yet in another window (causal-safe windows split a large
cluster by position). With ``--checkpoint`` the weights (and centroids) of a ``spattn train mqar``
run are loaded, else the model is freshly initialised. Example::

    python benchmarks/mqar_routing_windows.py --attention "window(size=8); routing(clusters=2)"
    python benchmarks/mqar_routing_windows.py --checkpoint runs/mqar_win_routing2/checkpoint.pt
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from spattn.bench.train import load_checkpoint
from spattn.data.mqar import generate
from spattn.models.builder import ModelConfig, build_model
from spattn.patterns.routing import Routing, layer_norm


def window_stats(model, inputs: torch.Tensor, targets: torch.Tensor, kv_pairs: int) -> dict:
    """Per query of the batch: does it share a window (last routing layer, head 0) with the position
    holding its value, is that position nearest to the same centroid, and is the prediction right?

    Returns the fractions of queries ``shared``, ``alone`` (in no window: zero output), ``correct``,
    ``correct_if_shared`` / ``correct_if_not_shared``, ``same_cluster_not_shared`` (the answer's
    nearest centroid is the query's but the windows differ), and the mean ``cluster_sizes`` (tokens
    per nearest centroid).
    """
    captured = []
    select = Routing.select

    def recording(self, q, k, causal=False, **kw):
        sel = select(self, q, k, causal, **kw)
        nearest = self._scores(layer_norm(q.float()), q.shape[1]).argmax(-1)  # [B, H, N]
        captured.append((sel, nearest, self.clusters))
        return sel

    Routing.select = recording
    try:
        with torch.no_grad():
            logits = model(inputs)
    finally:
        Routing.select = select
    if not captured:
        raise SystemExit("the model has no routing layer")
    sel, nearest, clusters = captured[-1]
    windows, nearest = sel.query_indices[:, 0], nearest[:, 0]  # head 0: [B, C, w] positions per window, [B, N]
    pred = logits.argmax(-1)
    rows = []  # (shared, alone, same cluster, correct) per query
    for b in range(inputs.shape[0]):
        keys = inputs[b, : 2 * kv_pairs : 2]
        for t in (targets[b] >= 0).nonzero().flatten().tolist():
            value_pos = 2 * int((keys == inputs[b, t]).nonzero()[0]) + 1
            member = (windows[b] == t).any(-1)  # [C]: windows holding the query
            rows.append(
                (
                    bool((windows[b][member] == value_pos).any()),
                    not bool(member.any()),
                    bool(nearest[b, t] == nearest[b, value_pos]),
                    bool(pred[b, t] == targets[b, t]),
                )
            )
    r = torch.tensor(rows, dtype=torch.float64)
    shared, alone, same, correct = r.unbind(-1)

    def rate(x, where):
        return float(x[where.bool()].mean()) if bool(where.any()) else float("nan")

    return {
        "shared": float(shared.mean()),
        "alone": float(alone.mean()),
        "correct": float(correct.mean()),
        "correct_if_shared": rate(correct, shared),
        "correct_if_not_shared": rate(correct, 1 - shared),
        "same_cluster_not_shared": float((same * (1 - shared)).mean()),
        "cluster_sizes": torch.nn.functional.one_hot(nearest, clusters).sum(1).double().mean(0).tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--attention",
        help="spec of a fresh model; with --checkpoint, replaces the run's spec "
        "(e.g. adds route_rotated=True for runs made before routing moved before RoPE)",
    )
    ap.add_argument("--checkpoint", help="checkpoint.pt of a `spattn train mqar` run")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        config = ModelConfig.from_dict(ckpt["model_config"])
        if args.attention:
            config.attention = args.attention
    elif args.attention:
        ckpt = None
        config = ModelConfig(
            kind="lm",
            vocab_size=8192,
            num_classes=8192,
            dim=64,
            depth=2,
            heads=1,
            max_len=256,
            positions="rope",
            mlp_ratio=0.0,
            attention=args.attention,
        )
    else:
        raise SystemExit("give --attention or --checkpoint")
    torch.manual_seed(args.seed)
    model = build_model(config).eval()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    kv_pairs = 16
    x, y = generate(np.random.default_rng(args.seed), args.examples, config.max_len, kv_pairs, config.vocab_size)
    st = window_stats(model, torch.from_numpy(x), torch.from_numpy(y), kv_pairs)
    print(
        f"{config.attention}: value position in the query's window for {st['shared']:.1%} of queries; "
        f"query in no window: {st['alone']:.1%}"
    )
    print(
        f"accuracy {st['correct']:.1%} (answer in the window: {st['correct_if_shared']:.1%}, not: "
        f"{st['correct_if_not_shared']:.1%}); answer nearest to the query's centroid but in another "
        f"window: {st['same_cluster_not_shared']:.1%}; tokens per nearest centroid: "
        + ", ".join(f"{c:.1f}" for c in st["cluster_sizes"])
    )


if __name__ == "__main__":
    main()
