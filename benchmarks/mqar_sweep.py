"""Zoology MQAR sweep (Arora et al. 2024, Fig. 2 setting, CPU-scaled); same options as ``spattn bench mqar``.

    python benchmarks/mqar_sweep.py --attentions dense "window(size=32)" "topk(k=8)" "routing(clusters=4)" linear \
        --seq-lens 256 --dims 64 --steps 3000

The issue-6 check (seq 256, 16 kv pairs, d_model 64, 2 layers, one attention per run, resumable):

    spattn train mqar --attention dense --seq-len 256 --kv-pairs 16 --dim 64 --depth 2 --batch-size 32 \
        --lr 2.2e-3 --warmup 100 --steps 3000 --eval-every 100 --eval-batches 8 --target-acc 0.99 --out runs/mqar_dense
"""

import argparse
import sys

from spattn.bench.mqar import add_mqar_arguments, run_mqar

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mqar_arguments(p)
    sys.exit(run_mqar(p.parse_args()))
