"""Datasets for spattn's benchmarks, all offline (generated, or read from files the user supplies).

Every dataset is a ``torch.utils.data.Dataset`` whose items are tuples:

* classification (ListOps, Pathfinder, LRA Text/Image): ``(tokens LongTensor [N], label int)``;
* token targets (MQAR, byte LM): ``(tokens LongTensor [N], targets LongTensor [N])``, -100 = no loss;
* two towers (LRA Retrieval): ``(tokens1 [N1], tokens2 [N2], label int)``.

Each module has a ``collate(items) -> dict`` that right-pads with the dataset's ``pad_id`` and returns
``tokens [B, N]``, ``target`` (``[B]`` or ``[B, N]``), ``mask [B, N]`` bool (True = real token, built
from the lengths, never from ``tokens != pad_id``), ``lengths [B]`` (and ``tokens2``/``mask2``/``lengths2``
for retrieval). Datasets expose ``vocab_size``, ``num_classes`` and ``pad_id``.

Submodules are imported on demand: ``from spattn.data import mqar``.
"""

__all__ = ["listops", "pathfinder", "mqar", "corpus", "lra_files"]
