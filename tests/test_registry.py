"""Spec parser and registry: refusals with clear messages (duplicate keywords, deep nesting, missing
required parameters) and suggestions for misspelled names."""

import pytest

import spattn
from spattn.registry import MAX_SPEC_DEPTH, MAX_SPEC_LENGTH, check_spec, parse_spec


def test_duplicate_keyword_is_refused():
    with pytest.raises(ValueError, match="keyword 'size' is given twice"):
        parse_spec("window(size=1, size=200)")
    with pytest.raises(ValueError, match="given twice"):
        spattn.pattern("window(size=1, size=200)")


@pytest.mark.parametrize(
    "spec",
    [
        "window(size=" + "(" * 200 + "1" + ")" * 200 + ")",
        "window(size=" + "[" * 5000 + "]" * 5000 + ")",
        "window(size=" + "-" * 100_000 + "1)",
        "window(size=(" + "(1," * 30 + ")" * 31 + ")",
        "window(size=" + "-" * (MAX_SPEC_LENGTH - 20) + "1)",
    ],
)
def test_deep_or_huge_specs_give_a_clear_value_error(spec):
    with pytest.raises(ValueError, match="nested too deeply|characters long|cannot parse") as err:
        parse_spec(spec)
    assert len(str(err.value)) < 300  # the spec is abbreviated in the message


def test_moderate_nesting_still_parses():
    nested = "(" * (MAX_SPEC_DEPTH - 2) + "1," + ")" * (MAX_SPEC_DEPTH - 2)
    name, kw = parse_spec(f"x(a={nested})")
    assert name == "x" and isinstance(kw["a"], tuple)


def test_bare_names_take_defaults_or_name_the_required_parameter():
    import torch

    q = torch.randn(1, 1, 128, 8)
    assert spattn.pattern("bigbird").layout(q, q).density() > 0  # every parameter has a default
    with pytest.raises(TypeError, match=r"^window: size is required, e\.g\. 'window\(size=\.\.\.\)'"):
        spattn.pattern("window")
    with pytest.raises(TypeError, match="dilated_window: size, dilation are required"):
        spattn.pattern("dilated_window")
    with pytest.raises(TypeError, match="size is required"):
        spattn.attention(q, q, q, "window")


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ValueError, match=r"unknown attention mechanism 'windw' \(did you mean 'window'\?\)"):
        spattn.pattern("windw(size=3)")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) sise \(did you mean 'size'\?\)"):
        spattn.pattern("window(sise=3)")
    with pytest.raises(ValueError, match="unknown attention mechanism 'zzzz'; valid names"):
        spattn.pattern("zzzz")


def test_check_spec_does_not_build_and_knows_filled_parameters():
    mech, kw = check_spec("routing_transformer(clusters=2)", provided=("dim", "heads"))
    assert mech.name == "routing_transformer" and kw == {"clusters": 2}
    with pytest.raises(TypeError, match="attention: routing_transformer: dim, heads are required"):
        check_spec("routing_transformer", "attention")
    with pytest.raises(ValueError, match="unknown parameter"):
        check_spec("window(size=3, dim=4)", provided=("dim",))  # filled by the caller, not given by the user


def test_numpy_scalars_are_accepted_where_numbers_are():
    import numpy as np
    import torch

    from spattn.bench.train import TrainConfig

    q = torch.randn(1, 1, 64, 8)
    torch.testing.assert_close(spattn.attention(q, q, q, scale=np.float32(0.25)), spattn.attention(q, q, q, scale=0.25))
    p = spattn.pattern("window", size=np.int64(8))
    assert p.size == 8 and type(p.size) is int
    cfg = TrainConfig(steps=np.int64(5), lr=np.float32(1e-3), batch_size=4, weight_decay=0.0, warmup=0)
    cfg.validate()
    assert type(cfg.steps) is int and type(cfg.lr) is float
