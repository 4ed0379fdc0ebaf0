"""Vocab-parallel EAFT over 2 and 4 gloo processes against the single-process core on the full logits.

One spawn per world size runs every case; each rank writes its outputs to a file, and the
parent compares them with `eaft_loss` on the concatenated logits (values, stats, gradients).
Those runs stay on the CPU; the single-rank op runs on the test device against the float64 reference.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eaft_plugins import eaft_loss
from eaft_plugins.ops.dense import token_scores
from reference import DTYPES, IGNORE, cpu_only, reference_loss, to_device, tol

pytestmark = pytest.mark.dist
GLOO = cpu_only("2 and 4 gloo processes on CPU tensors: the device machine has one GPU, NCCL needs one per rank")


def _batch(v, rows=13, masked=4, seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, v, generator=g) * scale).to(dtype)
    labels = torch.randint(0, v, (rows,), generator=g)
    labels[:masked] = IGNORE
    return logits, labels


def _cases(world):
    """name -> dict(logits, labels, sizes, kwargs, [grad_out]); sizes: each rank's vocab slice."""
    cases = {}
    v = 44
    even = [v // world] * world
    uneven = [7, 37] if world == 2 else [3, 10, 24, 7]  # shards smaller than K=20 too
    logits, labels = _batch(v)
    cases["default"] = dict(logits=logits, labels=labels, sizes=even, kwargs={})
    cases["uneven"] = dict(logits=logits, labels=labels, sizes=uneven, kwargs={})
    cases["full_entropy"] = dict(logits=logits, labels=labels, sizes=uneven, kwargs=dict(topk=None))
    cases["k_bigger_than_every_shard"] = dict(logits=logits, labels=labels, sizes=even, kwargs=dict(topk=30))
    cases["options"] = dict(
        logits=logits, labels=labels, sizes=uneven,
        kwargs=dict(alpha=0.5, entropy_norm="upstream", weight_norm="mean", num_items_in_batch=17),
    )
    sharp, sharp_labels = _batch(v, seed=3, scale=12.0)  # confident rows, so the hard gate fires
    cases["hard_gate"] = dict(logits=sharp, labels=sharp_labels, sizes=uneven, kwargs=dict(gate="hard", h_min=0.5))
    cases["shuffle_gate"] = dict(logits=logits, labels=labels, sizes=uneven, kwargs=dict(gate="shuffle"), seed=7)
    cases["bf16"] = dict(logits=_batch(v, dtype=torch.bfloat16)[0], labels=labels, sizes=uneven, kwargs={})
    cases["bf16_full"] = dict(logits=_batch(v, dtype=torch.bfloat16)[0], labels=labels, sizes=even, kwargs=dict(topk=None))
    all_masked = torch.full_like(labels, IGNORE)
    cases["all_masked"] = dict(logits=logits, labels=all_masked, sizes=uneven, kwargs={})
    low = labels.clone()
    low[low >= 0] = low[low >= 0] % uneven[0]  # every label in rank 0's shard: the others own none
    cases["labels_in_one_shard"] = dict(logits=logits, labels=low, sizes=uneven, kwargs={})
    with_inf = logits.clone()
    with_inf[:, 1::5] = float("-inf")  # masked vocabulary entries (never a label: the CE would be inf)
    rows = (labels != IGNORE).nonzero().squeeze(1)
    with_inf[rows, labels[rows]] = logits[rows, labels[rows]]
    cases["minus_inf"] = dict(logits=with_inf, labels=labels, sizes=uneven, kwargs=dict(topk=None))
    cases["minus_inf_topk"] = dict(logits=with_inf, labels=labels, sizes=uneven, kwargs={})
    g = torch.Generator().manual_seed(11)
    scale = torch.rand(labels.shape, generator=g)
    cases["per_token"] = dict(
        logits=logits, labels=labels, sizes=uneven, kwargs=dict(reduction="none", token_scale=scale),
        grad_out=torch.randn(labels.shape, generator=g),
    )
    batch3d, labels3d = _batch(v, rows=2 * 7, seed=5)
    cases["shifted_3d"] = dict(
        logits=batch3d.view(2, 7, v), labels=labels3d.view(2, 7), sizes=even, kwargs=dict(shift=True)
    )
    # Error cases: every rank must raise the same ValueError (and not hang).
    bad = labels.clone()
    bad[-1] = v
    cases["error_label"] = dict(logits=logits, labels=bad, sizes=uneven, kwargs={})
    nan = logits.clone()
    nan[-2, -1] = float("nan")
    cases["error_nan"] = dict(logits=nan, labels=labels, sizes=uneven, kwargs={})
    cases["error_option"] = dict(logits=logits, labels=labels, sizes=uneven, kwargs=dict(gate="sometimes"))
    cases["error_topk_vs_vocab"] = dict(logits=logits, labels=labels, sizes=uneven, kwargs=dict(topk=v + 1))
    # Bytes per token must not grow with the vocabulary: same rows, vocabularies 44 and 440.
    big, big_labels = _batch(440)
    cases["bytes_small_vocab"] = dict(logits=logits, labels=labels, sizes=even, kwargs={}, count_bytes=True)
    cases["bytes_big_vocab"] = dict(logits=big, labels=big_labels, sizes=[440 // world] * world, kwargs={}, count_bytes=True)
    return cases


class _ByteCounter:
    """Bytes each rank receives from all_reduce / broadcast (the tensor) and all_gather (the output list)."""

    def __init__(self):
        self.bytes = 0
        self._saved = {}

    def __enter__(self):
        for name in ("all_reduce", "all_gather", "broadcast"):
            real = getattr(dist, name)
            self._saved[name] = real

            def counted(tensor, *args, _real=real, _name=name, **kwargs):
                parts = tensor if _name == "all_gather" else [tensor]
                self.bytes += sum(t.numel() * t.element_size() for t in parts)
                return _real(tensor, *args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(dist, name, real)


def _worker(rank, world, workdir):
    from eaft_plugins.ops.vocab_parallel import vocab_parallel_eaft_loss

    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world)
    cases = torch.load(os.path.join(workdir, "cases.pt"))
    results = {}
    for name, case in cases.items():
        start = sum(case["sizes"][:rank])
        shard = case["logits"][..., start:start + case["sizes"][rank]].clone().requires_grad_(True)
        kwargs = dict(case["kwargs"])
        if "seed" in case:
            kwargs["generator"] = torch.Generator().manual_seed(case["seed"])
        counter = _ByteCounter()
        try:
            if case.get("count_bytes"):
                with counter:
                    out = vocab_parallel_eaft_loss(shard, case["labels"], **{"shift": False, **kwargs})
            else:
                out = vocab_parallel_eaft_loss(shard, case["labels"], **{"shift": False, **kwargs})
            grad_out = case.get("grad_out")
            (out.loss.backward() if grad_out is None else out.loss.backward(grad_out))
            results[name] = dict(
                loss=out.loss.detach(), stats=out.stats.to_vector(), grad=shard.grad, bytes=counter.bytes
            )
        except ValueError as exc:
            results[name] = dict(error=str(exc))
        dist.barrier()
    torch.save(results, os.path.join(workdir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _run(world, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"tp{world}")
    cases = _cases(world)
    torch.save(cases, workdir / "cases.pt")
    mp.spawn(_worker, args=(world, str(workdir)), nprocs=world, join=True)
    return cases, [torch.load(workdir / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def runs(request, tmp_path_factory):
    return request.param, *_run(request.param, tmp_path_factory)


def _reference(case):
    """The single-process core on the concatenated logits: loss, stats vector, full gradient."""
    logits = case["logits"].clone().requires_grad_(True)
    kwargs = dict(case["kwargs"])
    per_token = kwargs.pop("reduction", "mean") == "none"
    shift = kwargs.pop("shift", False)
    if "seed" in case:
        kwargs["generator"] = torch.Generator().manual_seed(case["seed"])
    if per_token:
        # sum_t g_t * s_t * w_t * ce_t is eaft_loss with token_scale g*s and N = 1.
        scale = kwargs.pop("token_scale")
        out = eaft_loss(logits, case["labels"], shift=False, token_scale=scale * case["grad_out"],
                        num_items_in_batch=1, **kwargs)
        scores = token_scores(case["logits"], case["labels"], shift=False, **kwargs)
        loss = torch.zeros(case["labels"].numel())
        loss[scores.index] = scores.weight * scores.ce * scale.reshape(-1)[scores.index]
    else:
        out = eaft_loss(logits, case["labels"], shift=shift, **kwargs)
        loss = out.loss.detach()
    out.loss.backward()
    return loss, out.stats.to_vector(), logits.grad


VALUE_CASES = [
    "default", "uneven", "full_entropy", "k_bigger_than_every_shard", "options", "hard_gate", "shuffle_gate",
    "bf16", "bf16_full", "all_masked", "labels_in_one_shard", "minus_inf", "minus_inf_topk", "per_token",
    "shifted_3d", "bytes_small_vocab",
]


@GLOO
@pytest.mark.parametrize("name", VALUE_CASES)
def test_matches_single_process_core(runs, name):
    world, cases, results = runs
    case = cases[name]
    ref_loss, ref_stats, ref_grad = _reference(case)
    bf16 = case["logits"].dtype == torch.bfloat16
    tol = dict(rtol=2e-2, atol=2e-3) if bf16 else dict(rtol=1e-5, atol=1e-6)
    for rank, res in enumerate(r[name] for r in results):
        assert "error" not in res, res.get("error")
        torch.testing.assert_close(res["loss"].reshape(-1).double(), ref_loss.reshape(-1).double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["stats"], ref_stats, rtol=1e-5, atol=1e-6)
        start = sum(case["sizes"][:rank])
        ref_shard = ref_grad[..., start:start + case["sizes"][rank]]
        torch.testing.assert_close(res["grad"].float(), ref_shard.float(), **tol)


@GLOO
def test_cases_are_not_trivial(runs):
    """The comparisons above exercise real weights: gates fire, shards miss labels, masks empty."""
    world, cases, results = runs
    stats = {n: results[0][n]["stats"] for n in ("hard_gate", "all_masked", "default")}
    assert stats["hard_gate"][3] > 0  # some confident conflicts were zero-weighted
    assert stats["hard_gate"][1] < stats["hard_gate"][4]
    assert stats["all_masked"][4] == 0 and results[0]["all_masked"]["loss"] == 0
    assert stats["default"][4] == 9
    # Ranks that own none of the labels still get a gradient (the softmax term), ranks agree on the loss.
    assert results[-1]["labels_in_one_shard"]["grad"].abs().sum() > 0
    assert results[0]["shuffle_gate"]["loss"] != results[0]["default"]["loss"]


@GLOO
@pytest.mark.parametrize("name", ["error_label", "error_nan", "error_option", "error_topk_vs_vocab"])
def test_errors_on_every_rank(runs, name):
    world, cases, results = runs
    expected = {"error_label": "labels must be in [0, 44)", "error_nan": "NaN or inf",
                "error_option": "gate must be one of", "error_topk_vs_vocab": "larger than the vocabulary (44)"}[name]
    for res in (r[name] for r in results):
        assert expected in res.get("error", ""), res


@GLOO
def test_bytes_per_token_do_not_grow_with_vocab(runs):
    """Same rows, 10x the vocabulary: the collectives carry the same number of bytes (O(K*tp))."""
    world, cases, results = runs
    small = results[0]["bytes_small_vocab"]["bytes"]
    big = results[0]["bytes_big_vocab"]["bytes"]
    assert small > 0 and small == big
    supervised = int((cases["bytes_small_vocab"]["labels"] != IGNORE).sum())
    # Per token: K fp32 values from each rank + (sumexp, label logit); plus the layout exchange.
    per_token = 20 * world * 4 + 2 * 4
    assert small <= supervised * per_token + 2 * 8 * world


SINGLE_RANK_CASES = [{}, {"topk": None}, {"alpha": 0.5, "entropy_norm": "upstream"}, {"gate": "hard", "h_min": 0.5},
                     {"weight_norm": "mean", "num_items": 17}]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SINGLE_RANK_CASES)
def test_single_rank_matches_float64_reference(case, dtype):
    from eaft_plugins.ops.vocab_parallel import vocab_parallel_eaft_loss

    logits, labels = to_device(*_batch(44, scale=6.0), dtype=dtype)
    x = logits.clone().requires_grad_(True)
    kwargs = {("num_items_in_batch" if k == "num_items" else k): v for k, v in case.items()}
    out = vocab_parallel_eaft_loss(x, labels, shift=False, **kwargs)
    out.loss.backward()
    want, grad, count = reference_loss(logits, labels, shift=False, **case)
    assert out.loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)  # bf16 logits are upcast exactly
    assert int(out.stats.tokens) == count
    torch.testing.assert_close(x.grad.cpu().double(), grad, **tol(dtype, 1e-4, 1e-6))


def test_single_process_without_distributed_equals_core():
    from eaft_plugins.ops.vocab_parallel import vocab_parallel_eaft_loss

    logits, labels = to_device(*_batch(44))
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    out = vocab_parallel_eaft_loss(a, labels, shift=False)
    ref = eaft_loss(b, labels, shift=False)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(a.grad, b.grad)
    with pytest.raises(ValueError, match="reduction must be one of"):
        vocab_parallel_eaft_loss(logits, labels, reduction="sum")


class _LargestFp32(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest float32 tensor any op creates."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("topk", [20, None])
def test_no_full_fp32_copy_of_bf16_logits(topk):
    from eaft_plugins.ops.vocab_parallel import vocab_parallel_eaft_loss

    logits, labels = to_device(*_batch(500, rows=256, masked=5, dtype=torch.bfloat16))
    x = logits.clone().requires_grad_(True)
    mode = _LargestFp32()
    with mode:
        out = vocab_parallel_eaft_loss(x, labels, topk=topk, chunk_size=16, reduction="none", shift=False)
        out.loss.backward(torch.ones_like(out.loss))
    assert x.grad.dtype == torch.bfloat16
    assert mode.largest <= 16 * 500, mode.largest  # one chunk, never [tokens, vocab]
