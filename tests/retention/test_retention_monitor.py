"""The retention core on a tiny random Llama with SmolLM2's tokenizer: the KL bound, the step-0 values, every
reading and its standard error against a float64 recomputation, multiple choice as lm-eval-harness scores it,
the builtin presets and their provenance, the exact-KL option, and every probe-file error."""

import json
import math
import statistics

import pytest
import torch

from eaft_plugins.retention import RetentionMonitor, kl_from_reference, load_rows, parse_probe, reference_of
from eaft_plugins.retention.monitor import model_context, prompt_ids
from eaft_plugins.retention.probe import PRESETS, Row, counts
from eaft_plugins.retention.readings import estimate


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
        Row("mc", "Capital of France?", ("Paris", "Rome", "Madrid"), 0, "m1"), Row("prompt", "Say hi.", where="p2"),
        Row("text", "Bees make honey from nectar.", where="t2"), Row("mc", "2 + 2 =", ("3", "4"), 1, "m2"),
        Row("mc", "The sky is", ("blue", "green", "red", "black"), 0, "m3")]


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


# ---------------------------------------------------------------- the readings against float64


def _lp(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def _recompute(mon, base_model, model, tok):
    """Every item scored alone (no padding, no batching), in float64: the per-item values."""
    kl, text, mc = [], [], []
    for i, row in enumerate(mon.rows):
        if row.kind == "prompt":
            p = prompt_ids(tok, row.text)
            ids = p + mon.answers[i]
            lb, lo = _lp(base_model, ids)[len(p) - 1:-1], _lp(model, ids)[len(p) - 1:-1]
            full = (lb.exp() * (lb - lo)).sum(-1)
            bound = kl_from_reference(reference_of(lb.float(), mon.topk), lo.float()).double()
            assert (bound <= full + 1e-5).all()  # a lower bound of the full KL
            kl.append((float(bound.sum()), len(ids) - len(p)))
        elif row.kind == "text":
            ids = tok(row.text, add_special_tokens=False)["input_ids"]
            lo = _lp(model, ids)
            text.append((-float(lo[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).sum()), len(ids) - 1))
        else:
            ctx = tok(f"Question: {row.text}\nAnswer:", add_special_tokens=False)["input_ids"]
            sums = []
            for c in row.choices:
                ids = tok(f"Question: {row.text}\nAnswer: {c}", add_special_tokens=False)["input_ids"]
                lo = _lp(model, ids)
                sums.append(float(lo[len(ctx) - 1:-1].gather(-1, torch.tensor(ids[len(ctx):])[:, None]).sum()))
            s = torch.tensor(sums, dtype=torch.float64)
            norm = s - torch.logsumexp(s, 0)
            listed = "".join(f"\n{'ABCD'[j]}. {c}" for j, c in enumerate(row.choices))
            lctx = tok(f"Question: {row.text}{listed}\nAnswer:", add_special_tokens=False)["input_ids"]
            letters = [tok(f"Question: {row.text}{listed}\nAnswer: {'ABCD'[j]}", add_special_tokens=False)["input_ids"]
                       [len(lctx)] for j in range(len(row.choices))]
            ll = _lp(model, lctx)[-1, letters]
            lnorm = ll - torch.logsumexp(ll, 0)
            mc.append((float(norm[row.answer]), math.exp(norm[row.answer]), float(int(s.argmax()) == row.answer),
                       math.exp(lnorm[row.answer]), float(int(ll.argmax()) == row.answer)))
    return kl, text, mc


def _ratio_se(pairs):
    x = [a for a, _ in pairs]
    n = [b for _, b in pairs]
    r = sum(x) / sum(n)
    m = len(x)
    return r, math.sqrt(m / (m - 1) * sum((a - r * b) ** 2 for a, b in zip(x, n))) / sum(n)


def test_step_zero_is_the_base_and_readings_match_a_float64_recomputation(tok):
    model = tiny(tok)
    mon = RetentionMonitor(ROWS, tok, topk=16, max_new_tokens=6, batch_size=3)
    v0 = mon.build_reference(model)
    assert v0["retention/kl_base"] == 0.0 and v0["retention/kl_base_se"] == 0.0
    assert all(v0[f"retention/{k}_delta"] == 0.0 for k in ("text_nll", "mc_logp", "mc_prob", "mc_acc",
                                                          "mc_letter_prob", "mc_letter_acc"))
    assert mon.measure(model)["retention/kl_base"] < 1e-6
    assert 0 < mon.reference_bytes() < 1e5

    other = tiny(tok, seed=1)
    got = mon.measure(other)
    kl, text, mc = _recompute(mon, model, other, tok)
    _, base_text, base_mc = _recompute(mon, model, model, tok)
    want = {}
    want["kl_base"], want["kl_base_se"] = _ratio_se(kl)
    want["text_nll"], want["text_nll_se"] = _ratio_se(text)
    want["text_nll_delta"], want["text_nll_delta_se"] = _ratio_se([(a - b, n) for (a, n), (b, _) in zip(text, base_text)])
    for col, name in enumerate(("mc_logp", "mc_prob", "mc_acc", "mc_letter_prob", "mc_letter_acc")):
        values = [m[col] for m in mc]
        deltas = [m[col] - b[col] for m, b in zip(mc, base_mc)]
        want[name], want[name + "_se"] = statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))
        want[name + "_delta"] = statistics.mean(deltas)
        want[name + "_delta_se"] = statistics.stdev(deltas) / math.sqrt(len(deltas))
    for key, value in want.items():
        assert got["retention/" + key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # per item (eaft-repro) agrees with the aggregate
    per = mon.per_item(other)
    assert len(per["kl"]) == 2 and len(per["text_nll"]) == 2 and len(per["mc_prob"]) == 3
    assert statistics.mean(per["mc_prob"]) == pytest.approx(got["retention/mc_prob"], rel=1e-6)


def test_multiple_choice_is_scored_like_lm_eval_harness(tok):
    mon = RetentionMonitor(ROWS, tok, max_new_tokens=4)
    seqs = [s for s in mon.seqs if s.unit == 2]
    assert [s.role for s in seqs] == ["cloze", "cloze", "cloze", "letter"]  # every choice, then the lettered form
    for s, choice in zip(seqs, ("Paris", "Rome", "Madrid")):
        assert tok.decode(s.ids[:s.start]) == "Question: Capital of France?\nAnswer:"
        assert tok.decode(s.ids[s.start:]) == " " + choice  # the choice alone: no end-of-turn token
    letter = seqs[-1]
    assert tok.decode(letter.ids) == "Question: Capital of France?\nA. Paris\nB. Rome\nC. Madrid\nAnswer:"
    assert [tok.decode([t]) for t in letter.letters] == [" A", " B", " C"]
    assert all(tok.eos_token_id not in s.ids for s in mon.seqs if s.role in ("cloze", "letter"))


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


def test_exact_kl_option_and_its_memory_limit(tok, monkeypatch):
    spec = parse_probe("builtin:exact")
    assert spec.exact and spec.name == "builtin" and len(spec.rows) == 36
    from eaft_plugins.retention import monitor

    monkeypatch.setattr(monitor, "EXACT_LIMIT", 1000)
    with pytest.raises(ValueError, match=r"retention_probe: the exact KL would store up to .* GiB of base "
                                         r"distributions .* drop `:exact`"):
        RetentionMonitor(spec.rows, tok, topk=None)


def test_standard_error_is_the_spread_over_items():
    values = [0.2, 0.5, 0.9, 0.4]
    assert estimate(values, [1] * 4) == pytest.approx((statistics.mean(values),
                                                       statistics.stdev(values) / 2))
    # a ratio: equal n reduces to the mean of x / n
    r, se = estimate([2.0, 4.0, 9.0], [2, 2, 2])
    assert r == pytest.approx(2.5) and se == pytest.approx(statistics.stdev([1, 2, 4.5]) / math.sqrt(3))
    assert estimate([1.0], [1.0]) == (1.0, None)  # one item: no error


def test_capped_answers_are_counted(tok):
    mon = RetentionMonitor([ROWS[0], ROWS[3]], tok, max_new_tokens=2)
    mon.build_reference(tiny(tok))
    assert mon.capped == (2, 2)  # a random model does not end within 2 tokens


# ---------------------------------------------------------------- builtin presets: sizes, provenance, identity


def test_builtin_presets_have_fixed_sizes_and_nest(tok):
    small, large = load_rows("builtin"), load_rows("builtin-large")
    assert counts(small) == (PRESETS["builtin"],) * 3 and counts(large) == (PRESETS["builtin-large"],) * 3
    assert {r.id for r in small} <= {r.id for r in large}
    assert all(r.id and r.source in ("arc-challenge-test", "ifeval", "pubmedqa") for r in large)
    assert len({r.id for r in large}) == len(large)  # no item twice (the ARC prompts are other questions)
    mon = RetentionMonitor(small, tok)
    assert 3000 < mon.tokens < 6000
    # The items do not depend on the tokenizer or template (no token budget): only the fingerprint does.
    plain = type(tok).from_pretrained(tok.name_or_path)
    plain.chat_template = None
    other = RetentionMonitor(small, plain)
    assert other.identity()["ids"] == mon.identity()["ids"] and other.identity()["items"] == mon.identity()["items"]
    assert other.fingerprint() != mon.fingerprint()
    assert other.identity()["template_sha1"] != mon.identity()["template_sha1"]


def test_probe_files_regenerate_from_the_shared_data(shared_data):
    from eaft_plugins.retention.build_probe import main

    assert main(["--data", str(shared_data), "--check"]) == 0


def test_data_readme_names_every_source_and_licence():
    from eaft_plugins.retention.probe import DATA

    readme = (DATA / "README.md").read_text()
    for name, licence in (("probe_arc.jsonl", "CC BY-SA 4.0"), ("probe_ifeval.jsonl", "Apache-2.0"),
                          ("probe_pubmedqa.jsonl", "MIT")):
        assert name in readme and licence in readme
    for path in DATA.glob("*.json*"):
        assert path.name in readme, f"{path.name} is not described in {DATA / 'README.md'}"


# ---------------------------------------------------------------- probe files


def _write(tmp_path, lines):
    p = tmp_path / "probe.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_user_file_rows(tmp_path):
    path = _write(tmp_path, ['{"text": "Hello there, world."}', "", '{"prompt": "Say hi.", "id": "p7"}',
                             '{"question": "2+2?", "choices": ["3", "4"], "answer": "4", "source": "mine"}'])
    rows = load_rows(path)
    assert [r.kind for r in rows] == ["text", "prompt", "mc"] and rows[2].answer == 1
    assert rows[1].where.endswith("row 3") and rows[1].id == "p7" and rows[2].source == "mine"


@pytest.mark.parametrize("lines, match", [
    ([], "is empty"),
    (['{"text": "ok"}', '{"text": "ok"'], r"row 2 is not valid JSON"),
    (['{"txt": "ok"}'], r"row 1: unknown field 'txt'; expected exactly one of"),
    (['{"text": "ok", "prompt": "p"}'], r"row 1 has fields \['prompt', 'text'\]; expected exactly one of"),
    (['["a"]'], r"row 1 is a list"),
    (['{"text": ""}'], r'row 1: "text" must be a non-empty string'),
    (['{"text": "ok", "id": 3}'], r'row 1: "id" must be a non-empty string, got 3'),
    (['{"question": "q", "choices": ["a", "b"]}'], r"row 1: a multiple-choice row needs field 'answer'"),
    (['{"question": "q", "choices": ["a"], "answer": 0}'], r'"choices" must be a list of at least 2'),
    (['{"question": "q", "choices": ["a", "a"], "answer": 0}'], r'"choices" has the same choice twice'),
    (['{"question": "q", "choices": ["a", "b"], "answer": 2}'], r'"answer" must be the index \(0..1\)'),
])
def test_bad_probe_files_name_the_file_row_and_field(tmp_path, lines, match):
    path = _write(tmp_path, lines)
    with pytest.raises(ValueError, match=match) as err:
        load_rows(path, "LLaMA-Factory key `retention_probe`")
    assert "LLaMA-Factory key `retention_probe`" in str(err.value) and str(tmp_path) in str(err.value)


def test_missing_file_directory_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match=r"retention_probe: probe file '.*nope.jsonl' does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match=r"retention_probe: '.*' is a directory; give a JSONL file"):
        load_rows(str(tmp_path))
    with pytest.raises(ValueError, match="must be `builtin`, `builtin-large` or the path"):
        load_rows("")
    from eaft_plugins.retention.keys import check_keys

    with pytest.raises(ValueError, match=r"`retention_steps` must be an integer >= 1"):
        check_keys("builtin", 0)
    with pytest.raises(ValueError, match=r"`retention_steps` is set but `retention_probe` is not"):
        check_keys(None, 5)
    assert check_keys("builtin", "10") and check_keys("builtin-large:exact", None) and not check_keys(None, None)


def test_item_longer_than_the_context_names_the_row(tok, tmp_path):
    path = _write(tmp_path, ['{"text": "short text here"}', json.dumps({"text": "word " * 300})])
    model = tiny(tok, context=128)
    assert model_context(model) == 128
    with pytest.raises(ValueError, match=r"probe.jsonl row 2 needs \d+ tokens, more than the model's context of 128"):
        RetentionMonitor(load_rows(path), tok, context=model_context(model))
    path = _write(tmp_path, [json.dumps({"prompt": "word " * 100})])
    with pytest.raises(ValueError, match=r"row 1 needs \d+ tokens \(prompt \+ 64 answer tokens\)"):
        RetentionMonitor(load_rows(path), tok, context=128)
