"""benchmarks/loss_bench.py's --topk and --family axes: the cases they make, and that the dense and fused
methods compute the same loss for every family's logit transform (so their times compare like for like)."""

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import loss_bench  # noqa: E402


def test_axes_make_every_case_and_topk_only_for_eaft():
    args = argparse.Namespace(methods=["torch_ce", "dense_eaft", "fused_eaft"], loss_only=True,
                              topk=["20", "full"], family=["llama", "gemma2"])
    got = loss_bench.cases(args)
    assert ("full", "torch_ce", "gemma2", None) in got and ("loss", "dense_eaft", "llama", "full") in got
    assert ("full", "fused_eaft", "gemma2", "20") in got and ("loss", "fused_eaft", "llama", "20") not in got
    assert len(got) == 2 * (1 + 2 + 2) + 2 * (1 + 2)  # per family: full (CE, 2 dense, 2 fused), loss (CE, 2 dense)
    assert loss_bench._family_arg("llama,cohere") == ["llama", "cohere"]
    with pytest.raises(argparse.ArgumentTypeError, match="--family 'gpt' is unknown"):
        loss_bench._family_arg("gpt")
    with pytest.raises(argparse.ArgumentTypeError, match="--topk takes integers >= 2 or 'full'"):
        loss_bench._topk_arg("20,1")


@pytest.mark.parametrize("family", list(loss_bench.FAMILIES))
def test_dense_and_fused_methods_agree_per_family(family):
    value = loss_bench.family_value(family)
    assert value is None if family == "llama" else value > 0
    args = argparse.Namespace(family=[family], family_value=value, topk=["full"], chunk=5, hidden=16, vocab=97)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 23, 16, generator=g)
    weight = torch.randn(97, 16, generator=g) * 3.0  # logits of ~12: soft-capping at 30 is not the identity
    labels = torch.randint(0, 97, (1, 23), generator=g)
    dense = loss_bench._loss_fn("dense_eaft", "full", args)(hidden, weight, labels)
    fused = loss_bench._loss_fn("fused_eaft", "full", args)(hidden, weight, labels)
    torch.testing.assert_close(fused, dense, rtol=1e-5, atol=1e-6)
    if value not in (None, 1.0):  # the transform is applied (Granite's default logits_scaling is 1.0)
        plain = argparse.Namespace(**{**vars(args), "family": ["llama"], "family_value": None})
        assert abs(float(loss_bench._loss_fn("dense_eaft", "full", plain)(hidden, weight, labels)) - float(dense)) > 1e-3


def test_default_axes_are_top20_and_llama(monkeypatch):
    seen = {}
    monkeypatch.setattr(loss_bench, "parent", lambda args: seen.update(vars(args)))
    loss_bench.main(["--tokens", "8"])
    assert seen["topk"] == ["20"] and seen["family"] == ["llama"]
    loss_bench.main(["--tokens", "8", "--topk", "20,full", "7", "--family", "gemma2,llama", "cohere"])
    assert seen["topk"] == ["20", "full", "7"] and seen["family"] == ["gemma2", "llama", "cohere"]
