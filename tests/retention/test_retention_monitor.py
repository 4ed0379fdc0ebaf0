"""The retention core on a tiny random Llama with SmolLM2's tokenizer: the KL bound, the step-0 values, the
numbers against a plain recomputation, the probe budget, and every probe-file error."""

import json

import pytest
import torch

from eaft_plugins.retention import RetentionMonitor, kl_from_reference, load_rows, reference_of
from eaft_plugins.retention.monitor import model_context, prompt_ids
from eaft_plugins.retention.probe import Row


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def tiny(tok, seed=0, context=512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=context,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


ROWS = [Row("prompt", "Name a colour.", where="p1"), Row("text", "The Moon is Earth's only natural satellite.", where="t1"),
        Row("mc", "Capital of France?", ("Paris", "Rome"), 0, "m1"), Row("prompt", "Say hi.", where="p2"),
        Row("text", "Bees make honey from nectar.", where="t2")]


# ---------------------------------------------------------------- the KL bound


def test_topk_kl_is_a_lower_bound_and_exact_at_full_vocabulary():
    torch.manual_seed(0)
    base = torch.log_softmax(torch.randn(7, 50) * 3, -1)
    cur = torch.log_softmax(torch.randn(7, 50) * 3, -1)
    full = (base.exp() * (base - cur)).sum(-1)
    for k in (1, 4, 16, 49):
        bound = kl_from_reference(reference_of(base, k), cur)
        assert (bound <= full + 1e-6).all() and (bound >= -1e-6).all()
    assert torch.allclose(kl_from_reference(reference_of(base, 50), cur), full, atol=1e-6)  # k = |V|
    assert torch.allclose(kl_from_reference(reference_of(base, None), cur), full, atol=1e-6)  # stored in full
    assert kl_from_reference(reference_of(base, 8), base).abs().max() < 1e-6  # KL(p || p) = 0
    # more entries, tighter bound
    assert (kl_from_reference(reference_of(base, 16), cur) >= kl_from_reference(reference_of(base, 4), cur) - 1e-6).all()


# ---------------------------------------------------------------- the monitor on a model


def test_step_zero_is_the_base_and_numbers_match_a_recomputation(tok):
    model = tiny(tok)
    mon = RetentionMonitor(ROWS, tok, topk=16, max_new_tokens=6, batch_size=2)
    v0 = mon.build_reference(model)
    assert v0["retention/kl_base"] == 0.0
    assert v0["retention/text_nll_delta"] == 0.0 and v0["retention/mc_logp_delta"] == 0.0
    assert mon.measure(model)["retention/kl_base"] < 1e-6
    assert 0 < mon.reference_bytes() < 1e5

    other = tiny(tok, seed=1)
    got = mon.measure(other)
    # recomputed one sequence at a time, no padding, full-vocabulary KL
    kl_num = kl_den = nll_num = nll_den = 0.0
    mc = []
    with torch.no_grad():
        for it in mon.local:
            ids = torch.tensor([it.ids])
            lb = torch.log_softmax(model(ids).logits[0, it.start - 1:-1], -1)
            lo = torch.log_softmax(other(ids).logits[0, it.start - 1:-1], -1)
            target = ids[0, it.start:, None]
            if it.row.kind == "prompt":
                kl_full = (lb.exp() * (lb - lo)).sum(-1)
                assert (kl_from_reference(it.ref, lo) <= kl_full + 1e-5).all()
                kl_num += float(kl_from_reference(reference_of(lb, 16), lo).sum())
                kl_den += len(target)
            elif it.row.kind == "text":
                nll_num -= float(lo.gather(-1, target).sum())
                nll_den += len(target)
            else:
                mc.append(float(lo.gather(-1, target).sum()))
    assert got["retention/kl_base"] == pytest.approx(kl_num / kl_den, rel=1e-4)
    assert got["retention/text_nll"] == pytest.approx(nll_num / nll_den, rel=1e-5)
    assert got["retention/mc_logp"] == pytest.approx(sum(mc) / len(mc), rel=1e-5)
    assert got["retention/text_nll_delta"] == pytest.approx(got["retention/text_nll"] - v0["retention/text_nll"])
    # the MC item scores the right choice + end token after the chat prompt
    mc_item = next(it for it in mon.local if it.row.kind == "mc")
    assert tok.decode(mc_item.ids[mc_item.start:]) == "Paris" + tok.eos_token
    assert mc_item.ids[:mc_item.start] == prompt_ids(tok, "Capital of France?")
    # per item (eaft-repro) agrees with the aggregate
    per = mon.per_item(other)
    assert len(per["kl"]) == 2 and len(per["text_nll"]) == 2 and len(per["mc_logp"]) == 1
    assert per["mc_logp"][0] == pytest.approx(got["retention/mc_logp"], rel=1e-5)


def test_full_vocabulary_topk_equals_exact_kl(tok):
    model, other = tiny(tok), tiny(tok, seed=2)
    rows = [ROWS[0], ROWS[3]]
    a = RetentionMonitor(rows, tok, topk=len(tok), max_new_tokens=5)
    b = RetentionMonitor(rows, tok, topk=None, max_new_tokens=5)
    a.build_reference(model), b.build_reference(model)
    ka, kb = a.measure(other)["retention/kl_base"], b.measure(other)["retention/kl_base"]
    assert ka > 0 and ka == pytest.approx(kb, rel=1e-5)
    small = RetentionMonitor(rows, tok, topk=4, max_new_tokens=5)
    small.build_reference(model)
    assert small.measure(other)["retention/kl_base"] <= kb + 1e-6


def test_builtin_probe_fits_the_budget_with_every_kind(tok):
    mon = RetentionMonitor(load_rows("builtin"), tok, budget=2048, max_new_tokens=48)
    assert 1500 < mon.tokens <= 2048
    assert {it.row.kind for it in mon.items} == {"prompt", "text", "mc"}


# ---------------------------------------------------------------- probe files


def _write(tmp_path, lines):
    p = tmp_path / "probe.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_user_file_rows(tmp_path):
    path = _write(tmp_path, ['{"text": "Hello there, world."}', "", '{"prompt": "Say hi."}',
                             '{"question": "2+2?", "choices": ["3", "4"], "answer": "4"}'])
    rows = load_rows(path)
    assert [r.kind for r in rows] == ["text", "prompt", "mc"] and rows[2].answer == 1
    assert rows[1].where.endswith("row 3")


@pytest.mark.parametrize("lines, match", [
    ([], "is empty"),
    (['{"text": "ok"}', '{"text": "ok"'], r"row 2 is not valid JSON"),
    (['{"txt": "ok"}'], r"row 1 has keys \['txt'\]; expected exactly one of"),
    (['["a"]'], r"row 1 is a list"),
    (['{"text": ""}'], r'row 1: "text" must be a non-empty string'),
    (['{"question": "q", "choices": ["a"], "answer": 0}'], r'"choices" must be a list of at least 2'),
    (['{"question": "q", "choices": ["a", "b"], "answer": 2}'], r'"answer" must be the index \(0..1\)'),
])
def test_bad_probe_files_name_the_file_and_row(tmp_path, lines, match):
    path = _write(tmp_path, lines)
    with pytest.raises(ValueError, match=match) as err:
        load_rows(path, "LLaMA-Factory key `retention_probe`")
    assert "LLaMA-Factory key `retention_probe`" in str(err.value) and str(tmp_path) in str(err.value)


def test_missing_file_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match=r"retention_probe: probe file '.*nope.jsonl' does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="must be `builtin` or the path"):
        load_rows("")
    from eaft_plugins.retention.keys import check_keys

    with pytest.raises(ValueError, match=r"`retention_steps` must be an integer >= 1"):
        check_keys("builtin", 0)
    with pytest.raises(ValueError, match=r"`retention_steps` is set but `retention_probe` is not"):
        check_keys(None, 5)
    assert check_keys("builtin", "10") and not check_keys(None, None)


def test_item_longer_than_the_context_names_the_row(tok, tmp_path):
    path = _write(tmp_path, ['{"text": "short text here"}', json.dumps({"text": "word " * 300})])
    model = tiny(tok, context=128)
    assert model_context(model) == 128
    with pytest.raises(ValueError, match=r"probe.jsonl row 2 needs \d+ tokens, more than the model's context of 128"):
        RetentionMonitor(load_rows(path), tok, context=model_context(model))
    path = _write(tmp_path, [json.dumps({"prompt": "word " * 100})])
    with pytest.raises(ValueError, match=r"row 1 needs \d+ tokens \(prompt \+ 48 answer tokens\)"):
        RetentionMonitor(load_rows(path), tok, context=128)
