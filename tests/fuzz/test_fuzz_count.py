"""The fuzz tables hold at least 300 bad inputs (issue 16), spread over every kind of entry point."""

from . import test_fuzz_api as api
from . import test_fuzz_cli as cli
from . import test_fuzz_files as files
from . import test_fuzz_mechanisms as mechanisms
from . import test_fuzz_modules as modules

TABLES = {
    "attention": api.ATTENTION,
    "pattern / spec": api.PATTERN,
    "Layout": api.LAYOUT,
    "selections": api.SELECTIONS,
    "mechanism parameters": mechanisms.ROWS,
    "nn layers": modules.NN,
    "models": modules.MODELS,
    "approximations": modules.APPROX,
    "data generators": files.GENERATORS,
    "LRA files": files.LRA,
    "KV cache": files.KV,
    "calibration files": files.CALIBRATION,
    "CLI": cli.CLI,
    "hf.sparsify": cli.SPARSIFY_IDS,
}


def test_at_least_300_bad_inputs():
    sizes = {name: len(rows) for name, rows in TABLES.items()}
    assert sum(sizes.values()) >= 300, sizes
    assert min(sizes.values()) >= 10, sizes  # no entry point covered by a token row or two


if __name__ == "__main__":  # python -m tests.fuzz.test_fuzz_count: the table sizes
    for name, rows in TABLES.items():
        print(f"{name:22s} {len(rows):5d}")
    print(f"{'total':22s} {sum(len(r) for r in TABLES.values()):5d}")
