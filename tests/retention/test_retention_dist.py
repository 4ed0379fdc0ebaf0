"""Two processes under torchrun (gloo, CPU): the probe items are dealt over the ranks, every rank runs the
same number of forward calls (the short rank pads with zero-weight copies), the reduced values equal the
single-process ones, and the reference the two ranks saved is read back by one process (a resume with another
world size keeps the original reference)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def model(tok, seed):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def _rows():
    from eaft_plugins.retention.probe import Row

    return [Row("prompt", "Name a colour.", where="p1"), Row("text", "Bees make honey.", where="t1"),
            Row("prompt", "Say hi.", where="p2"), Row("mc", "2+2?", ("3", "4"), 1, "m1"),
            Row("text", "The Moon orbits the Earth.", where="t2"), Row("prompt", "Count to three.", where="p3")]


def worker(out_dir):
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from eaft_plugins.retention import RetentionMonitor
    from eaft_plugins.tools.smollm2 import local_smollm2

    tok = AutoTokenizer.from_pretrained(str(local_smollm2()))

    base, tuned = model(tok, 0), model(tok, 1)
    single = RetentionMonitor(_rows(), tok, topk=8, max_new_tokens=5, batch_size=1)
    single.build_reference(base)
    expected = single.measure(tuned)

    dist.init_process_group("gloo")
    calls = []
    for m in (base, tuned):
        m.register_forward_hook(lambda *a: calls.append(1))
    mon = RetentionMonitor(_rows(), tok, topk=8, max_new_tokens=5, batch_size=1)
    step0 = mon.build_reference(base)
    got = mon.measure(tuned)
    rank = dist.get_rank()
    torch.save(mon.state_dict(), Path(out_dir, f"retention_reference.rank{rank}.pt"))
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
    # item i to rank i % 2: rank 0 p1, p2, t2; rank 1 t1, the MC item (2 cloze + 1 letter), p3; padded to 5 each
    assert sorted([r0["real"], r1["real"]]) == [3, 5] and r0["local"] == r1["local"] == 5
    for r in (r0, r1):
        assert r["step0"]["retention/kl_base"] == 0.0
        for key, value in r["expected"].items():
            assert r["got"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key

    # One process (another world size) resumes from the two ranks' files: the same reference, the same readings.
    from transformers import AutoTokenizer

    from eaft_plugins.retention import RetentionMonitor
    from eaft_plugins.retention.callback import read_reference

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    states, why = read_reference(tmp_path)
    assert why is None and [s["rank"] for s in states] == [0, 1]
    alone = RetentionMonitor(_rows(), tok, topk=8, max_new_tokens=5, batch_size=1)
    assert alone.load_state_dicts(states) is None
    for key, value in alone.measure(model(tok, 1)).items():
        assert value == pytest.approx(r0["got"][key], rel=1e-5, abs=1e-7), key
    assert alone.load_state_dicts(states[:1]) == "the saved files lack 1 of the 3 prompt items (a rank's file missing?)"
    (tmp_path / "retention_reference.rank1.pt").unlink()
    assert "retention_reference.rank1.pt is missing (the run that saved the reference had 2 ranks)" in read_reference(
        tmp_path)[1]

if __name__ == "__main__":
    worker(sys.argv[1])
