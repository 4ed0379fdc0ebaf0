"""eaft-analyze: scoring against plain references, and the CLI end to end on SmolLM2."""

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from eaft_plugins.tools import analyze, mathgen
from eaft_plugins.options import EAFTOptions


class _Logits(torch.nn.Module):
    """A stand-in 'model' returning fixed logits per known input row, to check score_sequences' bookkeeping."""

    def __init__(self, ids, logits):
        super().__init__()
        self.ids, self.table = ids, logits
        self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.config = type("C", (), {"vocab_size": logits.size(-1)})()

    def forward(self, input_ids, attention_mask=None):
        rows = [next(i for i in range(len(self.ids)) if torch.equal(self.ids[i], r)) for r in input_ids]
        return type("O", (), {"logits": self.table[rows]})()


class _Tok:
    pad_token_id = 0


def _plain_entropy(row):
    p = [math.exp(v) for v in row]
    s = sum(p)
    return -sum(q / s * math.log(q / s) for q in p if q > 0)


def test_conflict_share_and_entropy_against_plain_count():
    torch.manual_seed(0)
    b, t, v = 3, 7, 30
    logits = torch.randn(b, t, v)
    # Make a few rows confidently wrong: a huge logit on token 0, labels elsewhere.
    logits[0, 2, 0] = 40.0
    logits[1, 4, 0] = 40.0
    logits[2, 1, 5] = 40.0  # confident and right (label 5 below): not a conflict
    ids = torch.randint(1, v, (b, t))
    ids[0, 3], ids[1, 5], ids[2, 2] = 7, 9, 5
    labels = ids.clone()
    labels[:, :2] = -100  # prompt
    seqs = [(ids[i].tolist(), labels[i].tolist()) for i in range(b)]
    opts = EAFTOptions(topk=10, h_min=0.15, p_min=0.1)
    got = analyze.score_sequences(_Logits(ids, logits), _Tok(), seqs, opts, ks=(5, v), batch_size=2, progress=False)

    # Independent count: plain python over the same rows.
    conflicts, n, exact = 0, 0, []
    for i in range(b):
        for j in range(t - 1):
            y = labels[i, j + 1].item()
            if y == -100:
                continue
            row = logits[i, j].tolist()
            lse = math.log(sum(math.exp(x) for x in row))
            p = math.exp(row[y] - lse)
            top = sorted(row, reverse=True)[:10]
            h = _plain_entropy(top) / math.log(10)
            conflicts += (h < 0.15) and (p < 0.1)
            n += 1
            exact.append(_plain_entropy(row))
    assert conflicts == 2
    assert got["p"].numel() == n
    assert int(got["conflict"].sum()) == conflicts
    summ = analyze.summarize(got, opts, (5, v))
    assert summ["conflict_share"] == pytest.approx(conflicts / n)
    # top-K entropy with K = |V| is the exact entropy, and both match the plain formula
    assert torch.allclose(got[f"h_top{v}"], got["h_exact"], atol=1e-5)
    assert got["h_exact"].tolist() == pytest.approx(exact, abs=1e-4)
    assert summ["topk_vs_exact"][str(v)]["pearson"] == pytest.approx(1.0, abs=1e-6)
    assert 0 <= summ["topk_vs_exact"]["5"]["pearson"] <= 1.0 + 1e-9
    # EAFT weight with the soft gate = Htilde ** alpha
    assert torch.allclose(got["weight"], got["h_norm"])


def test_formats_to_messages():
    alp = {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "S"}
    assert analyze.to_messages(alp) == [{"role": "system", "content": "S"}, {"role": "user", "content": "Add\n2 and 3"},
                                        {"role": "assistant", "content": "5"}]
    sg = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    assert analyze.to_messages(sg) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ms = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    assert analyze.to_messages(ms) == ms["messages"]
    with pytest.raises(ValueError, match="--format"):
        analyze.to_messages({"x": 1})


def test_format_flag_offers_every_reader_format():
    """--format accepts swift_query (ms-swift query/response rows), which to_messages reads."""
    sq = {"query": "q2", "response": "r2", "history": [["q1", "r1"]]}
    want = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "r1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "r2"}]
    assert analyze.to_messages(sq) == analyze.to_messages(sq, "swift_query") == want
    args = analyze.build_parser().parse_args(["--model", "m", "--data", "d.jsonl", "--format", "swift_query"])
    assert args.format == "swift_query"
    for fmt in ("alpaca", "sharegpt", "messages", "swift_query"):
        analyze.build_parser().parse_args(["--model", "m", "--data", "d", "--format", fmt])
    with pytest.raises(ValueError, match="swift_query"):
        analyze.to_messages({"x": 1}, "bogus")


def test_supervised_tokens_are_the_assistant_turns(smollm2_dir):
    from transformers import AutoTokenizer

    from eaft_plugins.tools.evaluation import encode_conversation

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    msgs = [{"role": "user", "content": "Say one"}, {"role": "assistant", "content": "one two"},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "three"}]
    ids, labels, _ = encode_conversation(tok, msgs, 512)
    sup = tok.decode([t for t, l in zip(ids, labels) if l != -100])
    assert sup == "one two<|im_end|>three<|im_end|>"


@pytest.mark.e2e
def test_cli_quick_run(tmp_path, smollm2_dir):
    items = mathgen.generate(6, seed=3)
    data = mathgen.write_messages(items, tmp_path / "train.jsonl")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "eaft_plugins.tools.analyze", "--model", str(smollm2_dir), "--data", str(data),
           "--out", str(out), "--on-policy", "3", "--max-new-tokens", "16", "--ks", "5,20,49152", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("landscape.png", "topk_corr.png", "summary.json", "tokens.csv", "conflicts.md", "own_responses.json"):
        assert (out / f).stat().st_size > 0, f
    s = json.loads((out / "summary.json").read_text())
    d = s["data_tokens"]
    assert d["sequences"] == 6 and d["tokens"] > 6 * 20
    assert 0 <= d["conflict_share"] <= 1 and 0 < d["mean_p"] < 1 and 0 <= d["mean_weight"] <= 1
    assert d["topk_vs_exact"]["49152"]["pearson"] == pytest.approx(1.0, abs=1e-6)
    assert d["topk_vs_exact"]["49152"]["mean_abs_diff_nats"] < 1e-4
    assert d["conflict_tokens"] == round(d["conflict_share"] * d["tokens"])
    assert s["own_responses"]["tokens"] > 0
    with open(out / "tokens.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == d["tokens"] + s["own_responses"]["tokens"]
    # the CSV agrees with the summary: count the data rows' conflicts from p and Htilde independently
    data_rows = [r for r in rows if r["source"] == "data"]
    plain = sum(float(r["h_norm"]) < 0.15 and float(r["p"]) < 0.1 for r in data_rows)
    assert plain == d["conflict_tokens"] == sum(int(r["conflict"]) for r in data_rows)


def test_option_flags_come_from_the_schema(capsys):
    from eaft_plugins.tools.analyze import SCORING_SETTINGS, build_parser, main

    help_text = build_parser().format_help()
    for setting in SCORING_SETTINGS:
        assert f"--{setting.name.replace('_', '-')}" in help_text
    assert {s.name for s in SCORING_SETTINGS} == {"topk", "alpha", "entropy_norm", "gate", "h_min", "p_min"}
    with pytest.raises(SystemExit):
        main(["--model", "m", "--data", "d.json", "--gate", "sharp"])
    assert "--gate 'sharp' is invalid: gate must be one of ['soft', 'hard', 'shuffle']" in capsys.readouterr().err
