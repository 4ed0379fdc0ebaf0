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


# ---------------------------------------------------------------- bad input: `eaft-analyze: error: ...`, exit 2, no model


ALPACA = '{"instruction": "Add 2 and 3", "output": "5"}\n'


def run_main(capsys, *argv):
    """analyze.main's exit code and stderr; the model path does not exist, so any error must come before it loads."""
    with pytest.raises(SystemExit) as exit_:
        analyze.main(["--model", "no/such-model", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_.value.code, err.strip().splitlines()[-1]


BAD_INPUT = [  # (id, file name, its text, flags, words the error line must hold)
    # --format that does not match the rows: the format asked, the row's keys, the formats that fit (was KeyError)
    ("format-mismatch", "a.jsonl", ALPACA, ["--format", "messages"],
     ["line 1: --format messages needs the key messages", "keys ['instruction', 'output']", "it fits --format alpaca"]),
    ("no-format-fits", "a.jsonl", '{"q": 1}\n', ["--format", "sharegpt"],
     ["needs the key conversations", "keys ['q']", "no format fits it: messages needs messages"]),
    ("auto-row-2", "a.jsonl", ALPACA + '{"instruction": "x"}\n', [],
     ["a.jsonl line 2: cannot tell the data format from keys ['instruction']"]),
    # not JSON: the file and the line (was a bare JSONDecodeError)
    ("jsonl-line", "bad.jsonl", ALPACA + '{"instruction": "x", \n', [], ["bad.jsonl line 2: not valid JSON"]),
    ("json-line-column", "bad.json", '[{"instruction": "x",\n "output": }]', [],
     ["bad.json line 2 column 12: not valid JSON (Expecting value)"]),
    ("empty", "empty.jsonl", "\n  \n", [], ["empty.jsonl is empty"]),
    ("no-rows", "none.json", "[]", [], ["none.json has no rows"]),
    ("not-an-object", "arr.json", '[{"query": "q", "response": "r"}, 3]', [],
     ["arr.json item 2 is a JSON number, not an object"]),
    ("binary", "bin.jsonl", b"\x80\x02\x8a\n", [], ["bin.jsonl is not UTF-8 text"]),  # a pickle, say: never unpickled
    # rows with the format's keys but not its shape (were TypeError / AttributeError / unpacking errors)
    ("conversations-text", "t.jsonl", '{"conversations": "hi"}\n', [],
     ['"conversations" must be a list of {"from", "value"} objects']),
    ("sharegpt-role", "t.jsonl", '{"conversations": [{"from": "bot", "value": "x"}]}\n', [],
     ["unknown sharegpt role 'bot'"]),
    ("content-number", "t.jsonl", '{"messages": [{"role": "user", "content": 5}]}\n', [], ["a text role and content"]),
    ("instruction-list", "t.jsonl", '{"instruction": ["x"], "output": "y"}\n', [],
     ['"instruction" must be text, got [\'x\']']),
    ("history-pair", "t.jsonl", '{"query": "q", "response": "r", "history": [["only one"]]}\n', [],
     ['"history" must be a list of [question, answer] pairs']),
    ("no-assistant", "t.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', [],
     ["no row has an assistant turn"]),
    # flags
    ("ks-junk", "a.jsonl", ALPACA, ["--ks", "5,x"], ["--ks must be comma-separated integers >= 1"]),
    ("ks-zero", "a.jsonl", ALPACA, ["--ks", "0"], ["--ks must be comma-separated integers >= 1"]),
    ("limit-zero", "a.jsonl", ALPACA, ["--limit", "0"], ["argument --limit: must be an integer >= 1, got '0'"]),
    ("batch-negative", "a.jsonl", ALPACA, ["--batch-size", "-2"], ["argument --batch-size: must be an integer >= 1"]),
    ("temperature-zero", "a.jsonl", ALPACA, ["--sample", "--temperature", "0"],
     ["--temperature must be > 0 with --sample"]),
    ("device-junk", "a.jsonl", ALPACA, ["--device", "gpu0"], ["--device 'gpu0' is not a device"]),
    ("out-is-a-file", "a.jsonl", ALPACA, ["--out", "{data}"], ["is a file; give a folder"]),
]


@pytest.mark.parametrize("name, text, flags, words", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_an_error_line_not_a_traceback(capsys, tmp_path, name, text, flags, words):
    data = tmp_path / name
    data.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, line = run_main(capsys, "--data", str(data), *[f.format(data=data) for f in flags])
    assert code == 2 and line.startswith("eaft-analyze: error: "), line
    for w in words:
        assert w in line, line


@pytest.mark.parametrize("make, words", [
    (lambda tmp: tmp / "missing.jsonl", "missing.jsonl: no such file"),
    (lambda tmp: tmp, "is a directory; --data takes a .json or .jsonl file"),
])
def test_missing_data_file_or_a_directory_is_named(capsys, tmp_path, make, words):
    path = make(tmp_path)
    code, line = run_main(capsys, "--data", str(path))
    assert code == 2 and f"eaft-analyze: error: {path}" in line and words in line, line


def test_the_data_is_checked_before_the_model_loads(monkeypatch, capsys, tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text(ALPACA + '{"messages": 3}\n')
    monkeypatch.setattr(analyze, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the data"))
    code, line = run_main(capsys, "--data", str(data))
    assert code == 2 and "a.jsonl line 2" in line


def test_a_folder_without_a_model_is_named(capsys, tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text(ALPACA)
    with pytest.raises(SystemExit) as exit_:
        analyze.main(["--model", str(tmp_path / "nothing"), "--data", str(data), "--out", str(tmp_path / "out")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and line.startswith(f"eaft-analyze: error: --model {tmp_path / 'nothing'}: "), line


def test_an_out_folder_that_cannot_be_made_is_named(monkeypatch, capsys, tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text(ALPACA)
    monkeypatch.setattr(analyze, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, line = run_main(capsys, "--data", str(data), "--out", str(data / "out"))  # under a file
    assert code == 2 and f"--out {data / 'out'}: cannot create the folder (Not a directory)" in line, line
