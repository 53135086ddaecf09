"""Datasets for spattn's benchmarks, all offline (generated, or read from files the user supplies).

The lowest layer of spattn: nothing here imports the rest of the package. Import submodules on
demand (``from spattn.data import mqar``):

==============  ========================================================  =========  ======  =========
module          dataset                                                   vocab      pad_id  classes
==============  ========================================================  =========  ======  =========
``mqar``        ``MQARDataset(num_examples, seq_len, kv_pairs, ...)``     V (8192)   —       V (LM)
``listops``     ``ListOpsDataset(split, num_examples, seed, ...)``        16         0       10
``corpus``      ``ByteLMDataset(split, seq_len, num_examples, ...)``      256        —       256 (LM)
``pathfinder``  ``PathfinderDataset(num_examples, seed, resolution, ...)`` 256        —       2
``lra_files``   ``load_text / load_retrieval / load_image / load_listops`` 256 (16)   0       2/2/10/10
==============  ========================================================  =========  ======  =========

``needle`` generates text prompts for LLM evaluation instead (passkey, RULER-style needles, variable
tracking, common words; :func:`spattn.data.needle.make_task`), scored by ``string_match_all``.

Every dataset is a ``torch.utils.data.Dataset`` with attributes ``vocab_size``, ``num_classes`` and
``pad_id``; its items are tuples:

* classification (ListOps, Pathfinder, LRA Text/Image/ListOps): ``(tokens LongTensor [N], label int)``;
* per-token targets (MQAR, byte LM): ``(tokens LongTensor [N], targets LongTensor [N])``, -100 = no loss;
* two towers (LRA Retrieval): ``(tokens1 LongTensor [N1], tokens2 LongTensor [N2], label int)``.

Each module has ``collate(items) -> dict`` (also a ``collate`` staticmethod on the dataset; the LRA
loaders return theirs in :class:`~spattn.data.lra_files.LRASplits`) that right-pads with ``pad_id``:

* ``tokens [B, N]`` long; ``target``: ``[B]`` long, or ``[B, N]`` long padded with -100;
* ``mask [B, N]`` bool, True = real token, built from the lengths (never ``tokens != pad_id``: pixel
  and byte value 0 are data); ``lengths [B]`` long;
* retrieval also ``tokens2``, ``mask2``, ``lengths2``.

Generated data is deterministic by seed; ListOps and Pathfinder are cached as ``.npz`` files under
``cache_dir`` (default ``$SPATTN_CACHE`` or ``~/.cache/spattn``; a corrupt file is regenerated with a
warning).
"""

__all__ = ["listops", "pathfinder", "mqar", "corpus", "lra_files", "needle"]
