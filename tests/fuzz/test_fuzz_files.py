"""Fuzz: data generators, the LRA file readers, KV cache / selector state and Double Sparsity calibration files.

Files are malformed, truncated, not UTF-8, missing or of the wrong kind; each must raise an error naming
the file (or the argument / field) and what was expected.
"""

from __future__ import annotations

import atexit
import json
import math
import pickle
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from spattn.data import corpus, listops, lra_files, mqar, needle, pathfinder
from spattn.kvcache import KVCache, LabelCache, LayerState, PageSummary
from spattn.patterns.decode import DoubleSparsity

from ._table import Bad, check, check_message, params

VE, TE = ValueError, TypeError
FNF = FileNotFoundError
EITHER = (ValueError, TypeError)
ROOT = Path(tempfile.mkdtemp(prefix="spattn-fuzz-"))
atexit.register(shutil.rmtree, ROOT, True)


def write(rel: str, data) -> Path:
    path = ROOT / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def folder(name: str, files: dict) -> Path:
    for rel, data in files.items():
        write(f"{name}/{rel}", data)
    return ROOT / name


# ------------------------------------------------------------------ generators

GENERATORS = [
    Bad("listops-n-neg", lambda: listops.generate(-1), VE, "num_examples"),
    Bad("listops-n-float", lambda: listops.generate(2.0), TE, "num_examples"),
    Bad("listops-seed-neg", lambda: listops.generate(1, seed=-1), VE, "seed"),
    Bad("listops-split", lambda: listops.generate(1, split="dev"), VE, "split"),
    Bad("listops-minlen-str", lambda: listops.generate(1, min_len="5"), TE, "min_len"),
    Bad("listops-maxlen-1", lambda: listops.generate(1, max_len=1), VE, "max_len"),
    Bad("listops-range", lambda: listops.generate(1, min_len=10, max_len=11), VE, "min_len"),
    Bad("listops-depth-0", lambda: listops.generate(1, max_depth=0), VE, "max_depth"),
    Bad("listops-depth-1", lambda: listops.generate(1, min_len=5, max_depth=1), VE, "max_depth"),
    Bad("listops-args-1", lambda: listops.generate(1, max_args=1), VE, "max_args"),
    Bad("listops-dataset-split", lambda: listops.ListOpsDataset("dev", 2, use_cache=False), VE, "split"),
    Bad("listops-from-text", lambda: listops.from_text("[MAX 2 foo ]"), VE, "foo"),
    Bad("listops-evaluate-empty", lambda: listops.evaluate([]), VE, "tokens"),
    Bad("listops-evaluate-unbalanced", lambda: listops.evaluate(listops.from_text("[MAX 2 3")), VE, "tokens"),
    Bad("listops-evaluate-bad-id", lambda: listops.evaluate([99]), VE, "tokens"),
    Bad("listops-majority-empty", lambda: listops.majority_accuracy([]), VE, "label"),
    Bad("mqar-seq-odd", lambda: mqar.MQARDataset(2, seq_len=65), VE, "seq_len"),
    Bad("mqar-seq-str", lambda: mqar.MQARDataset(2, seq_len="64"), TE, "seq_len"),
    Bad("mqar-kv-0", lambda: mqar.MQARDataset(2, kv_pairs=0), VE, "kv_pairs"),
    Bad("mqar-kv-vocab", lambda: mqar.MQARDataset(2, kv_pairs=8, vocab_size=8, seq_len=64), VE, "kv_pairs"),
    Bad("mqar-kv-len", lambda: mqar.MQARDataset(2, kv_pairs=32, seq_len=64), VE, "seq_len"),
    Bad("mqar-vocab-3", lambda: mqar.MQARDataset(2, vocab_size=3), VE, "vocab_size"),
    Bad("mqar-power-0", lambda: mqar.MQARDataset(2, power_a=0.0), VE, "power_a"),
    Bad("mqar-power-nan", lambda: mqar.MQARDataset(2, power_a=math.nan), VE, "power_a"),
    Bad("mqar-power-bool", lambda: mqar.MQARDataset(2, power_a=True), VE, "power_a"),
    Bad("mqar-passes-0", lambda: mqar.MQARDataset(2, num_passes=0), VE, "num_passes"),
    Bad("mqar-seed-neg", lambda: mqar.MQARDataset(2, seed=-3), VE, "seed"),
    Bad("mqar-n-neg", lambda: mqar.MQARDataset(-2), VE, "num_examples"),
    Bad("mqar-index", lambda: mqar.MQARDataset(2, seq_len=64, kv_pairs=4)[5], IndexError, "index 5"),
    Bad("mqar-index-str", lambda: mqar.MQARDataset(2, seq_len=64, kv_pairs=4)["0"], TE, "index"),
    Bad(
        "listops-index",
        lambda: listops.ListOpsDataset("train", 2, min_len=5, max_len=30, use_cache=False)[7],
        IndexError,
        "index 7",
    ),
    Bad(
        "listops-index-float",
        lambda: listops.ListOpsDataset("train", 2, min_len=5, max_len=30, use_cache=False)[0.5],
        TE,
        "index",
    ),
    Bad(
        "lra-seq-index",
        lambda: lra_files.SequenceDataset([np.zeros(3, np.uint8)], [0], 256, 2)[-2],
        IndexError,
        "index -2",
    ),
    Bad(
        "lra-pair-index",
        lambda: lra_files.PairDataset([np.zeros(3, np.uint8)], [np.zeros(3, np.uint8)], [0])[1],
        IndexError,
        "index 1",
    ),
    Bad("lra-seq-lengths", lambda: lra_files.SequenceDataset([np.zeros(3, np.uint8)], [0, 1], 256, 2), VE, "labels"),
    Bad("corpus-root-int", lambda: corpus.corpus_files(123), TE, "root"),
    Bad("mqar-rnq-str", lambda: mqar.MQARDataset(2, random_non_queries="yes"), TE, "random_non_queries"),
    Bad("mqar-generate-rng", lambda: mqar.generate(0, 1, 64, 4), TE, "rng"),
    Bad("pf-resolution", lambda: pathfinder.config_for(48), VE, "resolution"),
    Bad("pf-difficulty", lambda: pathfinder.config_for(32, "extreme"), VE, "difficulty"),
    Bad("pf-override-unknown", lambda: pathfinder.config_for(32, colour=3), TE, "colour"),
    Bad("pf-override-neg", lambda: pathfinder.config_for(32, paddle_length=-1.0), VE, "paddle_length"),
    Bad("pf-override-nan", lambda: pathfinder.config_for(32, contrast=math.nan), VE, "contrast"),
    Bad("pf-override-inf", lambda: pathfinder.config_for(32, marker_radius=math.inf), VE, "marker_radius"),
    Bad("pf-margins", lambda: pathfinder.config_for(32, paddle_margins=()), VE, "paddle_margins"),
    Bad("pf-margins-str", lambda: pathfinder.config_for(32, paddle_margins="1"), VE, "paddle_margins"),
    Bad("pf-contour-0", lambda: pathfinder.config_for(32, contour_length=0), VE, "contour_length"),
    Bad("pf-supersample-0", lambda: pathfinder.config_for(32, supersample=0), VE, "supersample"),
    Bad("pf-subpixel-str", lambda: pathfinder.config_for(32, subpixel="4"), EITHER, "subpixel"),
    Bad("pf-tries-0", lambda: pathfinder.config_for(32, max_target_tries=0), VE, "max_target_tries"),
    Bad("pf-padding-neg", lambda: pathfinder.config_for(32, padding=-1), VE, "padding"),
    Bad("pf-generate-n", lambda: pathfinder.generate(-1), VE, "num_examples"),
    Bad("pf-generate-cfg", lambda: pathfinder.generate(1, cfg={"resolution": 32}), TE, "cfg"),
    Bad("pf-dataset-res", lambda: pathfinder.PathfinderDataset(2, resolution=33, use_cache=False), VE, "resolution"),
    Bad("corpus-split", lambda: corpus.split_files(["a.py"], "dev"), VE, "split"),
    Bad("corpus-val-0", lambda: corpus.split_files(["a.py"], "val", 0), VE, "val_percent"),
    Bad("corpus-root-missing", lambda: corpus.corpus_files(ROOT / "nope"), FNF, "nope"),
    Bad("corpus-root-empty", lambda: corpus.corpus_files(folder("empty-corpus", {"a.txt": "x"})), FNF, "*.py"),
    Bad("corpus-seq-0", lambda: corpus.ByteLMDataset(seq_len=0), VE, "seq_len"),
    Bad("corpus-sampling", lambda: corpus.ByteLMDataset(sampling="shuffled"), VE, "sampling"),
    Bad(
        "corpus-short",
        lambda: corpus.ByteLMDataset(
            "train", seq_len=10_000, root=folder("tiny-corpus", {f"m{i}.py": "x = 1\n" for i in range(40)})
        ),
        VE,
        "seq_len",
    ),
    Bad("corpus-split-arg", lambda: corpus.ByteLMDataset("dev", seq_len=16), VE, "split"),
    Bad("needle-task", lambda: needle.make_task("haystack", 256), VE, "task"),
    Bad("needle-length-small", lambda: needle.make_task("passkey", 10), VE, "length"),
    Bad("needle-length-float", lambda: needle.make_task("passkey", 512.0), VE, "length"),
    Bad("needle-depth-2", lambda: needle.make_task("passkey", 512, depth=2.0), VE, "depth"),
    Bad("needle-depth-nan", lambda: needle.make_task("passkey", 512, depth=math.nan), VE, "depth"),
    Bad("needle-count-const", lambda: needle.make_task("passkey", 512, count_tokens=lambda s: 0), VE, "count_tokens"),
    Bad(
        "needle-count-str", lambda: needle.make_task("passkey", 512, count_tokens=lambda s: "3"), EITHER, "count_tokens"
    ),
    Bad("needle-count-none", lambda: needle.make_task("passkey", 512, count_tokens=None), TE, "count_tokens"),
    Bad("needle-keys-1", lambda: needle.niah_multikey(512, 0.5, keys=1), VE, "keys"),
    Bad("needle-haystack", lambda: needle.niah_single(512, 0.5, haystack="lorem"), VE, "haystack"),
    Bad("needle-vt-hops", lambda: needle.variable_tracking(512, hops=0), VE, "hops"),
    Bad("needle-vt-chains-str", lambda: needle.variable_tracking(512, chains="2"), EITHER, "chains"),
    Bad("needle-cw-freq", lambda: needle.common_words(512, freq_common=2, freq_rare=3), VE, "freq_common"),
    Bad("needle-cw-num-str", lambda: needle.common_words(512, num_common="3"), EITHER, "num_common"),
    Bad("needle-too-short", lambda: needle.common_words(64, num_common=40, freq_common=50), VE, "length"),
    Bad("needle-score-str", lambda: needle.string_match_all(3, ["a"]), TE, "prediction"),
    Bad("collate-empty", lambda: listops.collate([]), VE, "empty batch"),
    Bad("collate-mqar-empty", lambda: mqar.collate([]), VE, "empty batch"),
]

# ------------------------------------------------------------------ LRA files

GOOD_TSV = "0\tgood movie\n1\tbad movie\n"
AAN_ROW = "1\tid1\tid2\tfirst text\tsecond text\n"
PNG_SIG = b"\x89PNG\r\n\x1a\n"


def png(w=4, h=4, depth=8, colour=0, rows=None, ihdr=True, compress=True):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = rows if rows is not None else b"".join(b"\x00" + bytes(range(w)) for _ in range(h))
    out = PNG_SIG
    if ihdr:
        out += chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0))
    out += chunk(b"IDAT", zlib.compress(raw) if compress else raw) + chunk(b"IEND", b"")
    return out


def cifar(data=None, labels=None, obj=None):
    if obj is None:
        obj = {
            b"data": np.zeros((2, 3072), np.uint8) if data is None else data,
            b"labels": [0, 1] if labels is None else labels,
        }
    return pickle.dumps(obj)


def text_dir(name, train=GOOD_TSV, test=GOOD_TSV):
    return folder(name, {"imdb.train.tsv": train, "imdb.test.tsv": test})


def aan_dir(name, train=AAN_ROW, eval_=AAN_ROW, test=AAN_ROW):
    return folder(
        name, {"new_aan_pairs.train.tsv": train, "new_aan_pairs.eval.tsv": eval_, "new_aan_pairs.test.tsv": test}
    )


def listops_dir(name, train="Source\tTarget\n[MAX 2 3 ]\t3\n"):
    good = "Source\tTarget\n[MAX 2 3 ]\t3\n"
    return folder(name, {"basic_train.tsv": train, "basic_val.tsv": good, "basic_test.tsv": good})


def image_dir(name, first):
    files = {f"data_batch_{i}": cifar() for i in range(2, 6)}
    files["test_batch"] = cifar()
    files["data_batch_1"] = first
    return folder(name, files)


def pathfinder_dir(name, meta, images=None):
    files = {"metadata/0.npy": meta}
    files.update(images or {"imgs/0/sample_0.png": png(32, 32)})
    return folder(f"{name}/pathfinder32/curv_contour_length_14", files)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


LRA = [
    Bad("text-missing-dir", lambda: lra_files.load_text(ROOT / "absent"), FNF, "absent"),
    Bad("text-file-as-dir", lambda: lra_files.load_text(write("plainfile", "x")), FNF, "plainfile"),
    Bad(
        "text-missing-files", lambda: lra_files.load_text(folder("text-empty", {"readme": "x"})), FNF, "imdb.train.tsv"
    ),
    Bad(
        "text-no-tab",
        lambda: lra_files.load_text(text_dir("text-notab", train="0 no tab here\n")),
        VE,
        ("imdb.train.tsv", "line 1", "label<TAB>text"),
    ),
    Bad(
        "text-label-word",
        lambda: lra_files.load_text(text_dir("text-labelword", train="pos\ttext\n")),
        VE,
        ("imdb.train.tsv", "line 1", "label"),
    ),
    Bad(
        "text-label-3",
        lambda: lra_files.load_text(text_dir("text-label3", test="3\ttext\n")),
        VE,
        ("imdb.test.tsv", "line 1"),
    ),
    Bad(
        "text-label-nan",
        lambda: lra_files.load_text(text_dir("text-labelnan", train="nan\ttext\n")),
        VE,
        ("imdb.train.tsv", "label"),
    ),
    Bad(
        "text-label-inf",
        lambda: lra_files.load_text(text_dir("text-labelinf", train="inf\ttext\n")),
        VE,
        ("imdb.train.tsv", "label"),
    ),
    Bad(
        "text-label-frac",
        lambda: lra_files.load_text(text_dir("text-labelfrac", train="0.5\ttext\n")),
        VE,
        ("imdb.train.tsv", "label"),
    ),
    Bad(
        "text-empty",
        lambda: lra_files.load_text(text_dir("text-emptyfile", train="")),
        VE,
        ("imdb.train.tsv", "no examples"),
    ),
    Bad(
        "text-not-utf8",
        lambda: lra_files.load_text(text_dir("text-latin1", train=b"0\tcaf\xe9\n")),
        VE,
        ("imdb.train.tsv", "UTF-8"),
    ),
    Bad(
        "text-binary",
        lambda: lra_files.load_text(text_dir("text-binary", train=b"\xff\xfe\x00\x01" * 10)),
        VE,
        "imdb.train.tsv",
    ),
    Bad(
        "text-truncated",
        lambda: lra_files.load_text(text_dir("text-trunc", train=b"0\tgood movie\n1")),
        VE,
        ("imdb.train.tsv", "line 2"),
    ),
    Bad("text-maxlen-0", lambda: lra_files.load_text(text_dir("text-ok0"), max_len=0), VE, "max_len"),
    Bad("text-maxlen-str", lambda: lra_files.load_text(text_dir("text-ok1"), max_len="9"), TE, "max_len"),
    Bad(
        "text-acl-missing-neg",
        lambda: lra_files.load_text(folder("acl1", {"aclImdb/train/pos/0.txt": "x", "aclImdb/test/pos/0.txt": "x"})),
        FNF,
        "neg",
    ),
    Bad(
        "text-acl-empty",
        lambda: lra_files.load_text(
            folder(
                "acl2",
                {
                    "aclImdb/train/pos/a.md": "x",
                    "aclImdb/train/neg/a.md": "x",
                    "aclImdb/test/pos/a.md": "x",
                    "aclImdb/test/neg/a.md": "x",
                },
            )
        ),
        FNF,
        "*.txt",
    ),
    Bad(
        "aan-missing", lambda: lra_files.load_retrieval(folder("aan-none", {"x": "y"})), FNF, "new_aan_pairs.train.tsv"
    ),
    Bad(
        "aan-columns",
        lambda: lra_files.load_retrieval(aan_dir("aan-cols", train="1\tid1\ttext\n")),
        VE,
        ("new_aan_pairs.train.tsv", "line 1", "5 tab-separated columns"),
    ),
    Bad(
        "aan-label",
        lambda: lra_files.load_retrieval(aan_dir("aan-label", eval_="yes\ta\tb\tc\td\n")),
        VE,
        ("new_aan_pairs.eval.tsv", "label"),
    ),
    Bad(
        "aan-empty",
        lambda: lra_files.load_retrieval(aan_dir("aan-empty", test="\n\n")),
        VE,
        ("new_aan_pairs.test.tsv", "no examples"),
    ),
    Bad(
        "aan-not-utf8",
        lambda: lra_files.load_retrieval(aan_dir("aan-latin1", train=b"1\ta\tb\tcaf\xe9\td\n")),
        VE,
        ("new_aan_pairs.train.tsv", "UTF-8"),
    ),
    Bad(
        "aan-truncated",
        lambda: lra_files.load_retrieval(aan_dir("aan-trunc", train=AAN_ROW + "0\tid1\tid2\tfirst")),
        VE,
        ("new_aan_pairs.train.tsv", "line 2"),
    ),
    Bad(
        "aan-six-columns",
        lambda: lra_files.load_retrieval(aan_dir("aan-six", train="1\ta\tb\tc\td\te\n")),
        VE,
        ("new_aan_pairs.train.tsv", "line 1"),
    ),
    Bad("aan-maxlen", lambda: lra_files.load_retrieval(aan_dir("aan-ok"), max_len=-1), VE, "max_len"),
    Bad(
        "img-missing", lambda: lra_files.load_image(folder("img-none", {"data_batch_1": cifar()})), FNF, "data_batch_2"
    ),
    Bad("img-maxlen", lambda: lra_files.load_image(ROOT, max_len=100), VE, "max_len"),
    Bad("img-not-pickle", lambda: lra_files.load_image(image_dir("img-text", b"hello world")), VE, "data_batch_1"),
    Bad("img-truncated", lambda: lra_files.load_image(image_dir("img-trunc", cifar()[:50])), VE, "data_batch_1"),
    Bad("img-empty-file", lambda: lra_files.load_image(image_dir("img-empty", b"")), VE, "data_batch_1"),
    Bad(
        "img-evil",
        lambda: lra_files.load_image(image_dir("img-evil", pickle.dumps(Evil()))),
        VE,
        ("data_batch_1", "refusing"),
    ),
    Bad(
        "img-list", lambda: lra_files.load_image(image_dir("img-list", cifar(obj=[1, 2]))), VE, ("data_batch_1", "dict")
    ),
    Bad(
        "img-no-labels",
        lambda: lra_files.load_image(image_dir("img-nolab", cifar(obj={b"data": 1}))),
        VE,
        ("data_batch_1", "labels"),
    ),
    Bad(
        "img-shape",
        lambda: lra_files.load_image(image_dir("img-shape", cifar(data=np.zeros((2, 100), np.uint8)))),
        VE,
        ("data_batch_1", "3072"),
    ),
    Bad(
        "img-dtype",
        lambda: lra_files.load_image(image_dir("img-dtype", cifar(data=np.zeros((2, 3072), np.float32)))),
        VE,
        ("data_batch_1", "uint8"),
    ),
    Bad(
        "img-label-count",
        lambda: lra_files.load_image(image_dir("img-labcount", cifar(labels=[0]))),
        VE,
        "data_batch_1",
    ),
    Bad(
        "img-label-range",
        lambda: lra_files.load_image(image_dir("img-labrange", cifar(labels=[0, 10]))),
        VE,
        ("data_batch_1", "labels"),
    ),
    Bad(
        "img-label-str",
        lambda: lra_files.load_image(image_dir("img-labstr", cifar(labels=["a", "b"]))),
        VE,
        ("data_batch_1", "labels"),
    ),
    Bad(
        "img-label-2d",
        lambda: lra_files.load_image(image_dir("img-lab2d", cifar(labels=[[0, 1]]))),
        VE,
        ("data_batch_1", "labels"),
    ),
    Bad("cifar-missing", lambda: lra_files.read_cifar_batch(ROOT / "no_batch"), FNF, "no_batch"),
    Bad(
        "listops-header",
        lambda: lra_files.load_listops(listops_dir("lo-header", "src\ttgt\n")),
        VE,
        ("basic_train.tsv", "header"),
    ),
    Bad(
        "listops-columns",
        lambda: lra_files.load_listops(listops_dir("lo-cols", "Source\tTarget\n[MAX 2 ]\n")),
        VE,
        ("basic_train.tsv", "line 2"),
    ),
    Bad(
        "listops-token",
        lambda: lra_files.load_listops(listops_dir("lo-token", "Source\tTarget\n[FOO 2 ]\t2\n")),
        VE,
        ("basic_train.tsv", "line 2", "FOO"),
    ),
    Bad(
        "listops-label",
        lambda: lra_files.load_listops(listops_dir("lo-label", "Source\tTarget\n[MAX 2 ]\t12\n")),
        VE,
        ("basic_train.tsv", "line 2", "label"),
    ),
    Bad(
        "listops-not-utf8",
        lambda: lra_files.load_listops(listops_dir("lo-latin1", b"Source\tTarget\n[MAX \xe9 ]\t2\n")),
        VE,
        ("basic_train.tsv", "UTF-8"),
    ),
    Bad(
        "listops-empty-file",
        lambda: lra_files.load_listops(listops_dir("lo-empty", "")),
        VE,
        ("basic_train.tsv", "header"),
    ),
    Bad("listops-maxlen", lambda: lra_files.load_listops(listops_dir("lo-ok"), max_len=0), VE, "max_len"),
    Bad("listops-missing", lambda: lra_files.load_listops(ROOT / "lo-absent"), FNF, "lo-absent"),
    Bad("pf-resolution", lambda: lra_files.load_pathfinder(ROOT, resolution=48), VE, "resolution"),
    Bad("pf-maxlen", lambda: lra_files.load_pathfinder(ROOT, max_len=10), VE, "max_len"),
    Bad("pf-missing", lambda: lra_files.load_pathfinder(ROOT / "pf-absent"), FNF, "pf-absent"),
    Bad(
        "pf-no-meta-files",
        lambda: lra_files.load_pathfinder(
            folder("pf-nometa", {"pathfinder32/curv_contour_length_14/metadata/readme.txt": "x"})
        ),
        FNF,
        "metadata",
    ),
    Bad(
        "pf-meta-fields",
        lambda: lra_files.load_pathfinder(pathfinder_dir("pf-fields", "imgs/0 sample_0.png\n")),
        VE,
        ("0.npy", "line 1", "4"),
    ),
    Bad(
        "pf-meta-not-utf8",
        lambda: lra_files.load_pathfinder(pathfinder_dir("pf-latin1", b"imgs/0 sample_\xe9.png 0 1\n")),
        VE,
        ("0.npy", "UTF-8"),
    ),
    Bad(
        "pf-meta-label",
        lambda: lra_files.load_pathfinder(pathfinder_dir("pf-label", "imgs/0 sample_0.png 0 7\n")),
        VE,
        ("0.npy", "label"),
    ),
    Bad(
        "pf-image-missing",
        lambda: lra_files.load_pathfinder(pathfinder_dir("pf-noimg", "imgs/0 sample_9.png 0 1\n")),
        FNF,
        "sample_9.png",
    ),
    Bad(
        "pf-image-size",
        lambda: lra_files.load_pathfinder(
            pathfinder_dir("pf-size", "imgs/0 sample_0.png 0 1\n", {"imgs/0/sample_0.png": png(8, 8)})
        ),
        VE,
        ("sample_0.png", "32x32"),
    ),
    Bad(
        "pf-image-escape",
        lambda: lra_files.load_pathfinder(pathfinder_dir("pf-escape", "../../../../../etc passwd 0 1\n")),
        VE,
        "passwd",
    ),
    Bad(
        "pf-all-empty",
        lambda: lra_files.load_pathfinder(
            pathfinder_dir(
                "pf-black",
                "imgs/0 sample_0.png 0 1\n",
                {"imgs/0/sample_0.png": png(32, 32, rows=b"".join(b"\x00" + bytes(32) for _ in range(32)))},
            )
        ),
        VE,
        "non-empty",
    ),
    Bad("png-missing", lambda: lra_files.read_png_gray(ROOT / "none.png"), FNF, "none.png"),
    Bad("png-not-png", lambda: lra_files.read_png_gray(write("fake.png", b"GIF89a....")), VE, ("fake.png", "PNG")),
    Bad("png-empty", lambda: lra_files.read_png_gray(write("empty.png", b"")), VE, "empty.png"),
    Bad(
        "png-no-ihdr", lambda: lra_files.read_png_gray(write("noihdr.png", png(ihdr=False))), VE, ("noihdr.png", "IHDR")
    ),
    Bad("png-rgb", lambda: lra_files.read_png_gray(write("rgb.png", png(colour=2))), VE, ("rgb.png", "greyscale")),
    Bad("png-16bit", lambda: lra_files.read_png_gray(write("deep.png", png(depth=16))), VE, ("deep.png", "bit depth")),
    Bad(
        "png-corrupt-zlib",
        lambda: lra_files.read_png_gray(write("zlib.png", png(compress=False))),
        VE,
        ("zlib.png", "corrupt"),
    ),
    Bad(
        "png-short-data",
        lambda: lra_files.read_png_gray(write("short.png", png(rows=b"\x00\x01"))),
        VE,
        ("short.png", "bytes"),
    ),
    Bad(
        "png-filter",
        lambda: lra_files.read_png_gray(write("filter.png", png(rows=b"\x07" + bytes(4) + b"\x00" * 15))),
        VE,
        ("filter.png", "filter"),
    ),
    Bad("png-truncated", lambda: lra_files.read_png_gray(write("trunc.png", png()[:30])), VE, "trunc.png"),
    Bad(
        "png-huge-header",
        lambda: lra_files.read_png_gray(write("huge.png", png(w=100_000, h=100_000, rows=b"\x00"))),
        VE,
        "huge.png",
    ),
    Bad("png-directory", lambda: lra_files.read_png_gray(ROOT), FNF, str(ROOT)),
]

# ------------------------------------------------------------------ KV cache / selector state

KEYS = torch.randn(1, 2, 8, 4)


def cache_with_layer():
    c = KVCache()
    c.update(0, KEYS, KEYS)
    return c


KV = [
    Bad("kv-k-list", lambda: KVCache().update(0, [[0.0]], KEYS), TE, "k must be"),
    Bad("kv-v-3d", lambda: KVCache().update(0, KEYS, KEYS[0]), VE, "v must have shape"),
    Bad("kv-shape", lambda: KVCache().update(0, KEYS, KEYS[..., :2]), VE, "k and v"),
    Bad("kv-append-heads", lambda: cache_with_layer().update(0, KEYS[:, :1], KEYS[:, :1]), VE, "layer 0"),
    Bad("kv-append-dtype", lambda: cache_with_layer().update(0, KEYS.double(), KEYS.double()), VE, "layer 0"),
    Bad("kv-append-dim", lambda: cache_with_layer().update(0, KEYS[..., :2], KEYS[..., :2]), VE, "layer 0"),
    Bad("kv-kv-dtype", lambda: KVCache().update(0, KEYS, KEYS.double()), VE, "dtype"),
    Bad("kv-int-keys", lambda: KVCache().update(0, KEYS.long(), KEYS.long()), TE, "floating"),
    Bad("kv-layer-list", lambda: KVCache().update([0], KEYS, KEYS), TE, "layer"),
    Bad("kv-layer-float", lambda: KVCache().update(0.5, KEYS, KEYS), TE, "layer"),
    Bad("kv-length-unknown", lambda: KVCache().length("x"), TE, "layer"),
    Bad("page-0", lambda: PageSummary(0), VE, "page"),
    Bad("page-float", lambda: PageSummary(2.0), VE, "page"),
    Bad("page-keys-3d", lambda: PageSummary(4).update(KEYS[0]), VE, "keys"),
    Bad("page-keys-list", lambda: PageSummary(4).update([1.0]), TE, "keys"),
    Bad("page-keys-int", lambda: PageSummary(4).update(KEYS.long()), TE, "floating"),
    Bad("label-float", lambda: LabelCache(torch.zeros(2, 2)), TE, "channels"),
    Bad("label-1d", lambda: LabelCache(torch.zeros(2, dtype=torch.long)), TE, "channels"),
    Bad("label-dtype", lambda: LabelCache(torch.zeros(2, 2, dtype=torch.long), dtype="bfloat16"), TE, "dtype"),
    Bad("label-int-dtype", lambda: LabelCache(torch.zeros(2, 2, dtype=torch.long), dtype=torch.int8), TE, "dtype"),
    Bad("label-range", lambda: LabelCache(torch.full((2, 2), 9, dtype=torch.long)).update(KEYS), VE, "channel index 9"),
    Bad("label-negative", lambda: LabelCache(torch.full((2, 2), -1, dtype=torch.long)).update(KEYS), VE, "channel"),
    Bad("label-heads", lambda: LabelCache(torch.zeros(3, 2, dtype=torch.long)).update(KEYS), VE, "query heads"),
    Bad("label-keys-3d", lambda: LabelCache(torch.zeros(2, 2, dtype=torch.long)).update(KEYS[0]), VE, "keys"),
]

# ------------------------------------------------------------------ Double Sparsity calibration files


def calibration(name, content) -> str:
    return str(
        write(
            f"calib/{name}.json",
            content if isinstance(content, bytes) else (content if isinstance(content, str) else json.dumps(content)),
        )
    )


def ds(name, content):
    return lambda: DoubleSparsity(channels=2, calibration=calibration(name, content))


GOOD_ENTRY = {"layer": 0, "sum": [[1.0, 2.0, 3.0, 4.0]] * 2, "count": 3}


def calibrated_for_d4():
    path = calibration("good", {"layers": [GOOD_ENTRY]})
    return DoubleSparsity(channels=2, budget=2, calibration=path)


def use_wrong_head_dim():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 16, 8)
    return calibrated_for_d4().select(q, k, state=LayerState(None, 0))


def use_wrong_heads():
    q, k = torch.randn(1, 4, 1, 4), torch.randn(1, 4, 16, 4)
    return calibrated_for_d4().select(q, k, state=LayerState(None, 0))


CALIBRATION = [
    Bad("ds-missing", lambda: DoubleSparsity(calibration=str(ROOT / "nope.json")), VE, ("nope.json", "does not exist")),
    Bad("ds-directory", lambda: DoubleSparsity(calibration=str(ROOT)), VE, str(ROOT)),
    Bad("ds-not-json", ds("notjson", "{layers: ["), VE, ("notjson.json", "JSON")),
    Bad("ds-empty", ds("empty", ""), VE, ("empty.json", "JSON")),
    Bad("ds-not-utf8", ds("latin1", b'{"layers": "\xe9"}'), VE, ("latin1.json", "UTF-8")),
    Bad("ds-list", ds("list", [1, 2]), VE, ("list.json", "layers")),
    Bad("ds-no-layers", ds("nolayers", {"layer": []}), VE, ("nolayers.json", "layers")),
    Bad("ds-layers-dict", ds("layersdict", {"layers": {}}), VE, ("layersdict.json", "layers")),
    Bad("ds-entry-int", ds("entryint", {"layers": [3]}), VE, ("entryint.json", "layer")),
    Bad("ds-no-sum", ds("nosum", {"layers": [{"layer": 0, "count": 1}]}), VE, ("nosum.json", "sum")),
    Bad("ds-no-count", ds("nocount", {"layers": [{"layer": 0, "sum": [[1.0]]}]}), VE, ("nocount.json", "count")),
    Bad(
        "ds-no-layer-key",
        ds("nolayerkey", {"layers": [{"sum": [[1.0]], "count": 1}]}),
        VE,
        ("nolayerkey.json", "layer"),
    ),
    Bad("ds-sum-1d", ds("sum1d", {"layers": [dict(GOOD_ENTRY, sum=[1.0, 2.0])]}), VE, ("sum1d.json", "sum")),
    Bad(
        "ds-sum-ragged",
        ds("ragged", {"layers": [dict(GOOD_ENTRY, sum=[[1.0, 2.0], [1.0]])]}),
        VE,
        ("ragged.json", "sum"),
    ),
    Bad("ds-sum-str", ds("sumstr", {"layers": [dict(GOOD_ENTRY, sum=[["a", "b"]])]}), VE, ("sumstr.json", "sum")),
    Bad(
        "ds-sum-nan",
        ds("sumnan", '{"layers": [{"layer": 0, "sum": [[NaN, 1.0]], "count": 1}]}'),
        VE,
        ("sumnan.json", "sum"),
    ),
    Bad("ds-sum-neg", ds("sumneg", {"layers": [dict(GOOD_ENTRY, sum=[[-1.0, 2.0]])]}), VE, ("sumneg.json", "sum")),
    Bad("ds-sum-empty", ds("sumempty", {"layers": [dict(GOOD_ENTRY, sum=[[]])]}), VE, ("sumempty.json", "sum")),
    Bad("ds-count-0", ds("count0", {"layers": [dict(GOOD_ENTRY, count=0)]}), VE, ("count0.json", "count")),
    Bad("ds-count-str", ds("countstr", {"layers": [dict(GOOD_ENTRY, count="many")]}), VE, ("countstr.json", "count")),
    Bad(
        "ds-count-float", ds("countfloat", {"layers": [dict(GOOD_ENTRY, count=2.5)]}), VE, ("countfloat.json", "count")
    ),
    Bad("ds-layer-list", ds("layerlist", {"layers": [dict(GOOD_ENTRY, layer=[0])]}), VE, ("layerlist.json", "layer")),
    Bad("ds-layer-dup", ds("layerdup", {"layers": [GOOD_ENTRY, GOOD_ENTRY]}), VE, ("layerdup.json", "layer")),
    Bad(
        "ds-layer-float", ds("layerfloat", {"layers": [dict(GOOD_ENTRY, layer=1.5)]}), VE, ("layerfloat.json", "layer")
    ),
    Bad("ds-wrong-head-dim", use_wrong_head_dim, VE, ("head dim", "4")),
    Bad("ds-wrong-heads", use_wrong_heads, VE, "query heads"),
    Bad("ds-path-int", lambda: DoubleSparsity(calibration=3), TE, "calibration"),
    Bad("ds-save-dir", lambda: calibrated_for_d4().save(ROOT), (OSError, ValueError), str(ROOT)),
    Bad("ds-load-state-list", lambda: DoubleSparsity().load_state_dict([]), VE, "layers"),
    Bad("ds-load-state-entry", lambda: DoubleSparsity().load_state_dict({"layers": [{"layer": 0}]}), VE, "sum"),
    Bad(
        "ds-not-calibrated",
        lambda: DoubleSparsity(budget=2).select(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 16, 4)),
        VE,
        "not calibrated",
    ),
    Bad(
        "ds-unknown-layer",
        lambda: calibrated_for_d4().select(
            torch.randn(1, 2, 1, 4), torch.randn(1, 2, 16, 4), state=LayerState(None, 5)
        ),
        VE,
        "layer 5",
    ),
    Bad(
        "ds-calibrate-shape",
        lambda: calibrated_for_d4().calibrate(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), layer=0),
        VE,
        "layer 0",
    ),
]


@pytest.mark.parametrize("row", params(GENERATORS))
def test_generators_reject(row):
    check(row)


@pytest.mark.parametrize("row", params(LRA))
def test_lra_files_reject(row):
    check(row)


@pytest.mark.parametrize("row", params(KV))
def test_kvcache_rejects(row):
    check(row)


@pytest.mark.parametrize("row", params(CALIBRATION))
def test_calibration_rejects(row):
    check(row)


# ------------------------------------------------------------------ property tests: random bytes


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes_as_text_tsv(tmp_path, data):
    d = tmp_path / "text"
    d.mkdir(exist_ok=True)
    (d / "imdb.train.tsv").write_bytes(data)
    (d / "imdb.test.tsv").write_text(GOOD_TSV)
    try:
        lra_files.load_text(d)
    except (ValueError, FileNotFoundError) as err:
        check_message(err, "imdb.train.tsv")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes_as_png(tmp_path, data):
    path = tmp_path / "x.png"
    path.write_bytes(PNG_SIG + data)
    try:
        lra_files.read_png_gray(path)
    except ValueError as err:
        check_message(err, "x.png")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes_as_cifar_batch(tmp_path, data):
    path = tmp_path / "data_batch_1"
    path.write_bytes(data)
    with pytest.raises(ValueError) as info:
        lra_files.read_cifar_batch(path)
    check_message(info.value, "data_batch_1")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["layers", "layer", "sum", "count"]), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=JSON_VALUES)
def test_random_calibration_json(tmp_path, state):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(state))
    try:
        DoubleSparsity(channels=1, calibration=str(path))
    except ValueError as err:
        check_message(err, "calibration.json")


def test_calibration_round_trip(tmp_path):
    sel = DoubleSparsity(channels=2, budget=2)
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    sel.calibrate(q, k, layer=0)
    sel.save(tmp_path / "c.json")
    again = DoubleSparsity(channels=2, budget=2, calibration=str(tmp_path / "c.json"))
    assert torch.equal(again.importance(0), sel.importance(0))
