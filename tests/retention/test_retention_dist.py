"""Two processes under torchrun (gloo, CPU): the probe items are dealt over the ranks, every rank runs the
same number of forward calls (the short rank pads with a zero-weight copy), and the reduced values equal the
single-process ones."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def worker(out_dir):
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from eaft_plugins.retention import RetentionMonitor
    from eaft_plugins.retention.probe import Row
    from eaft_plugins.tools.smollm2 import local_smollm2

    tok = AutoTokenizer.from_pretrained(str(local_smollm2()))

    def model(seed):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id)
        return LlamaForCausalLM(cfg).eval()

    rows = [Row("prompt", "Name a colour.", where="p1"), Row("text", "Bees make honey.", where="t1"),
            Row("prompt", "Say hi.", where="p2"), Row("mc", "2+2?", ("3", "4"), 1, "m1"),
            Row("text", "The Moon orbits the Earth.", where="t2")]
    base, tuned = model(0), model(1)
    single = RetentionMonitor(rows, tok, topk=8, max_new_tokens=5, batch_size=1)
    single.build_reference(base)
    expected = single.measure(tuned)

    dist.init_process_group("gloo")
    calls = []
    for m in (base, tuned):
        m.register_forward_hook(lambda *a: calls.append(1))
    mon = RetentionMonitor(rows, tok, topk=8, max_new_tokens=5, batch_size=1)
    step0 = mon.build_reference(base)
    got = mon.measure(tuned)
    rank = dist.get_rank()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "expected": expected, "got": got, "step0": step0, "calls": len(calls),
        "real": sum(it.weight > 0 for it in mon.local), "local": len(mon.local)}))
    dist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_split_the_probe_and_agree(smollm2_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29700 + os.getpid() % 1000), __file__, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["calls"] == r1["calls"] > 0  # the same forward calls (generate steps included) on both ranks
    assert sorted([r0["real"], r1["real"]]) == [2, 3] and r0["local"] == r1["local"] == 3  # 1 prompt + 2 others, padded
    for r in (r0, r1):
        assert r["step0"]["retention/kl_base"] == 0.0
        for key, value in r["expected"].items():
            assert r["got"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


if __name__ == "__main__":
    worker(sys.argv[1])
