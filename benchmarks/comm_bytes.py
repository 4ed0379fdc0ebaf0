"""Bytes moved by vocab-parallel EAFT vs gathering the full logits, measured on real gloo runs.

For each tensor-parallel size, spawns that many CPU processes (gloo), gives each a vocabulary
shard of random logits at Qwen3-4B's vocabulary (151,936), and counts the bytes of the tensors
handed to torch.distributed collectives (per rank: the result buffer of all_gather, the tensor
of all_reduce / broadcast) during

  * `vocab_parallel_eaft_loss` forward + backward (ours), and
  * the alternative: all_gather the full logits, then the single-device `eaft_loss`.

It also checks that both give the same loss. Analytic count per supervised token and rank:
ours = K*tp fp32 gathered top-K values + 2 fp32 (sum-exp, label logit) = 4*(K*tp + 2) bytes
(topk=None: max, sum-exp, label logit, entropy: 4 fp32 = 16 bytes); full gather = V * sizeof(dtype).
The backward needs no communication (the global logsumexp is kept from the forward).

    python benchmarks/comm_bytes.py [--tp 2 4 8] [--tokens 16] [--vocab 151936] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class ByteCounter:
    """Counts the bytes each rank receives from all_reduce / broadcast / all_gather calls."""

    NAMES = ("all_reduce", "all_gather", "broadcast", "all_gather_into_tensor")

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self._saved = {}

    def __enter__(self):
        for name in self.NAMES:
            real = getattr(dist, name)
            self._saved[name] = real

            def counted(first, *args, _real=real, _name=name, **kwargs):
                parts = first if _name == "all_gather" else [first]
                self.bytes += sum(t.numel() * t.element_size() for t in parts)
                self.calls += 1
                return _real(first, *args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(dist, name, real)


def _worker(rank, world, workdir, vocab, tokens, topk, dtype_name):
    from eaft_plugins import eaft_loss
    from eaft_plugins.ops.vocab_parallel import vocab_parallel_eaft_loss

    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world)
    sizes = [vocab // world + (1 if r < vocab % world else 0) for r in range(world)]
    start = sum(sizes[:rank])
    g = torch.Generator().manual_seed(0)  # every rank draws the same full logits, keeps its shard
    full = (torch.randn(tokens, vocab, generator=g) * 3).to(DTYPES[dtype_name])
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    shard = full[:, start:start + sizes[rank]].clone().requires_grad_(True)

    with ByteCounter() as ours:
        out = vocab_parallel_eaft_loss(shard, labels, topk=topk, shift=False)
        out.loss.backward()
    with ByteCounter() as gather:
        local = shard.detach()
        parts = [torch.empty(tokens, s, dtype=local.dtype) for s in sizes]
        if len(set(sizes)) == 1:
            dist.all_gather(parts, local)
        else:  # gloo all_gather needs equal sizes: pad, then cut
            width = max(sizes)
            padded = [torch.empty(tokens, width, dtype=local.dtype) for _ in sizes]
            dist.all_gather(padded, torch.nn.functional.pad(local, (0, width - local.size(1))))
            parts = [p[:, :s] for p, s in zip(padded, sizes)]
        gathered = torch.cat(parts, dim=1).requires_grad_(True)
        ref = eaft_loss(gathered, labels, shift=False, topk=topk)
        ref.loss.backward()
    result = dict(ours=ours.bytes, ours_calls=ours.calls, gather=gather.bytes, gather_calls=gather.calls,
                  loss=out.loss.item(), ref_loss=ref.loss.item())
    with open(os.path.join(workdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def measure(tp, vocab, tokens, topk, dtype_name):
    with tempfile.TemporaryDirectory() as workdir:
        mp.spawn(_worker, args=(tp, workdir, vocab, tokens, topk, dtype_name), nprocs=tp, join=True)
        results = []
        for r in range(tp):
            with open(os.path.join(workdir, f"rank{r}.json")) as f:
                results.append(json.load(f))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--tokens", type=int, default=16, help="supervised tokens (rows) per rank")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (Qwen3-4B: 151936)")
    parser.add_argument("--topk", default="20", help="K, or 'full' for exact entropy")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the logits")
    args = parser.parse_args(argv)
    topk = None if args.topk == "full" else int(args.topk)
    elem = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()

    print(f"vocab={args.vocab} tokens={args.tokens} topk={args.topk} logits={args.dtype}; bytes received per rank")
    header = (f"{'tp':>3} {'EAFT bytes':>11} {'/token':>7} {'analytic':>8} {'gather bytes':>13} {'/token':>9} "
              f"{'analytic':>9} {'ratio':>7}  same loss")
    print(header)
    ok = True
    for tp in args.tp:
        res = measure(tp, args.vocab, args.tokens, topk, args.dtype)
        r0 = res[0]
        layout = 2 * 8 * tp  # the one-off (start, size) exchange, 2 int64 per rank
        ours_tok = (r0["ours"] - layout) / args.tokens
        gather_tok = r0["gather"] / args.tokens
        ours_analytic = 4 * (topk * tp + 2) if topk is not None else 16
        gather_analytic = args.vocab * elem
        same = all(abs(r["loss"] - r["ref_loss"]) <= 1e-4 * max(1.0, abs(r["ref_loss"])) for r in res)
        same = same and len({r["ours"] for r in res}) == 1
        ok = ok and same
        print(f"{tp:>3} {r0['ours']:>11,} {ours_tok:>7.0f} {ours_analytic:>8} {r0['gather']:>13,} {gather_tok:>9,.0f} "
              f"{gather_analytic:>9,} {r0['gather'] / r0['ours']:>6.0f}x  {'yes' if same else 'NO'}")
    print("EAFT bytes include the one-off 2-int64-per-rank shard-layout exchange; /token excludes it.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
