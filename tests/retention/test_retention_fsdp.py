"""FSDP on CPU with gloo, 2 processes, one launch (a tiny Llama, 2 steps each):

* through the transformers Trainer: accelerate (1.11) turns FSDP on only for accelerator devices, so on CPU a
  Trainer given `fsdp="full_shard"` runs DDP instead; the retention callback says so, and the monitor and fused
  EAFT train under that DDP;
* FSDP itself (torch's fully_shard, FSDP2, parameters really sharded over the 2 ranks as DTensors): the monitor's
  reference (greedy generation included) and readings equal one process scoring the unsharded model, and the fused
  EAFT loss and its steps equal the dense one's. (FSDP1, FullyShardedDataParallel, refuses CPU in torch 2.14:
  "FSDP needs a non-CPU accelerator device"; the monitor generates under it inside summon_full_params, untested here.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = ('{"prompt": "Name a colour."}\n{"text": "Bees make honey from the nectar of flowers."}\n'
         '{"prompt": "Say hello."}\n{"question": "2 + 2 = ?", "choices": ["3", "4", "5"], "answer": 1}\n'
         '{"text": "The Moon orbits the Earth."}\n')


def tiny_model(tok, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id))


def batches():
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 2000, (8, 16), generator=g)


def trainer_run(tok, out):
    """The Trainer with fsdp on CPU: which wrapper it trains with, and the monitor + fused EAFT under it."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from eaft_plugins.integrations.hf_trainer import with_eaft
    from eaft_plugins.retention import with_retention

    seen = []

    class Wrapped(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append(type(trainer.model_wrapped).__name__)

    args = TrainingArguments(output_dir=f"{out}/trainer", per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                             save_strategy="no", report_to="none", use_cpu=True, learning_rate=1e-2, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True, fsdp="full_shard",
                             fsdp_config={"sync_module_states": False,
                                          "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    rows = [{"input_ids": ids, "labels": ids} for ids in batches().tolist()]
    trainer = Trainer(model=tiny_model(tok), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                      callbacks=[Wrapped()])
    with_eaft(trainer, eaft_fused=True)
    with_retention(trainer, probe=f"{out}/probe.jsonl", steps=1)
    trainer.train()
    return {"wrapped": seen, "history": trainer.state.log_history}


def sharded_run(tok, out, fused):
    """2 steps of EAFT on an FSDP model, the monitor measuring at steps 0 and 2."""
    import torch
    import torch.distributed as dist

    from eaft_plugins import eaft_loss
    from eaft_plugins.models import patch_model_for_fused_eaft
    from eaft_plugins.retention import RetentionMonitor, load_rows

    model = tiny_model(tok)
    if fused:
        patch_model_for_fused_eaft(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    mon = RetentionMonitor(load_rows(f"{out}/probe.jsonl"), tok)
    step0 = mon.build_reference(model)
    sharded = [type(p).__name__ for p in model.parameters()]  # the probe leaves them sharded (optimizer built now)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rank = dist.get_rank()
    losses = []
    for step in range(2):
        ids = batches()[4 * step + 2 * rank: 4 * step + 2 * rank + 2]
        if fused:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = eaft_loss(model(input_ids=ids).logits, ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(float(t) / 2)
    shard_sizes = [p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()]
    return {"step0": step0, "step2": mon.measure(model), "losses": losses, "sharded": sharded,
            "local_numel": sum(shard_sizes)}


def worker(tok_dir, out):
    import torch.distributed as dist
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    result = {"trainer": trainer_run(tok, out)}  # accelerate initialises the gloo process group
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    for fused in (False, True):
        result[f"fsdp2_{'fused' if fused else 'dense'}"] = sharded_run(tok, out, fused)
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


@pytest.mark.dist
@pytest.mark.e2e
def test_monitor_and_eaft_under_fsdp(smollm2_dir, tmp_path):
    (tmp_path / "probe.jsonl").write_text(PROBE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29600 + os.getpid() % 1000), __file__, str(smollm2_dir), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))

    # What one process reads on the same models, unsharded: step 0, and after the dense steps on the full batch.
    import torch
    from transformers import AutoTokenizer

    from eaft_plugins import eaft_loss
    from eaft_plugins.retention import RetentionMonitor, load_rows

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = tiny_model(tok)
    single = RetentionMonitor(load_rows(str(tmp_path / "probe.jsonl")), tok)
    expected0 = single.build_reference(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(2):
        ids = batches()[4 * step: 4 * step + 4]
        # each rank's loss is its own 2 rows' token mean; FSDP averages the two ranks' gradients
        loss = (eaft_loss(model(input_ids=ids[:2]).logits, ids[:2]).loss
                + eaft_loss(model(input_ids=ids[2:]).logits, ids[2:]).loss) / 2
        loss.backward()
        opt.step()
        opt.zero_grad()
    expected2 = single.measure(model)

    # The Trainer on CPU: DDP, said so; the monitor and fused EAFT ran under it.
    assert "Trainer runs DDP" in proc.stdout + proc.stderr
    for r in (r0, r1):
        t = r["trainer"]
        assert set(t["wrapped"]) == {"DistributedDataParallel"}
        points = [h for h in t["history"] if "retention/kl_base" in h]
        assert [p["step"] for p in points] == [0, 1, 2] and points[2]["retention/kl_base"] > 0
        assert all("eaft/weight" in h for h in t["history"] if "loss" in h)
    # FSDP proper.
    full = sum(p.numel() for p in tiny_model(tok).parameters())
    for r in (r0, r1):
        for name in ("fsdp2_dense", "fsdp2_fused"):
            got = r[name]
            assert got["local_numel"] < full, name  # each rank holds a shard
            assert set(got["sharded"]) == {"DTensor"}, name
            for key, value in expected0.items():
                assert got["step0"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)
            for key, value in expected2.items():
                assert got["step2"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
            assert got["step2"]["retention/kl_base"] > 1e-8  # it moved
        assert r["fsdp2_fused"]["losses"] == pytest.approx(r["fsdp2_dense"]["losses"], rel=1e-5)
    for name in ("fsdp2_dense", "fsdp2_fused"):  # every rank reads the same values
        assert r0[name]["step2"] == pytest.approx(r1[name]["step2"]) and r0[name]["losses"] == r1[name]["losses"]


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
