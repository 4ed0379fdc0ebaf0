"""Issues #12 ("a reproduction you can trust") and #23 ("reproduce the paper row by row"): thinking
answers scored by EvalScope's own adapters, Hub sources offline, evaluation pins, the splits and metrics
the paper's numbers allow, AIME repeats, one command per row, output names, multi-node address, output
folders and template per model, truncation and teacher retries."""

from __future__ import annotations

import collections
import csv
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
from decimal import ROUND_HALF_DOWN, ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path

import pytest

import teacher

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SITE = Path(importlib.util.find_spec("swift").origin).parents[1] if importlib.util.find_spec("swift") else None


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


models = _load("repro_models", RECIPES / "common" / "models.py")
runner = _load("repro_evalscope_run", RECIPES / "eval" / "evalscope_run.py")
build_data = _load("repro_build_data", RECIPES / "math" / "build_data.py")
medical_data = _load("repro_medical", RECIPES / "medical" / "prepare_data.py")
agent_data = _load("repro_agent", RECIPES / "agent" / "prepare_data.py")
collect = _load("repro_collect", RECIPES / "eval" / "collect.py")
custom = _load("repro_custom", RECIPES / "eval" / "prepare_custom.py")
attainable = _load("repro_attainable", RECIPES / "eval" / "attainable.py")
generate = _load("repro_generate", RECIPES / "generate.py")
SWIFT_VENV = Path(os.environ.get("EAFT_SWIFT_VENV", ROOT / ".venv-swift"))


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "TP", "PP",
                        "ZERO_CONFIG", "AIME_REPEATS", "BASE_MODEL")}
    env.update(extra)
    return env


def _bash(script, *args, **env):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=_env(**env), timeout=60)


def _commands(res):
    assert res.returncode == 0, res.stderr
    return [shlex.split(l[2:]) for l in res.stdout.splitlines() if l.startswith("+ ") and not l.startswith("+ cd ")]


def _flags(argv):
    return {a[2:]: argv[i + 1] for i, a in enumerate(argv) if a.startswith("--") and i + 1 < len(argv)}


# ----------------------------------------------------------------------------- 7: thinking answers

THINKING_CASES = [  # (domain, model path, env) -> thinking
    ("medical", "Qwen/Qwen3-4B-Thinking-2507", {}, True),
    ("medical", "saves/llamafactory/medical/eaft", {}, True),  # no model in the path: its base (hparams.yaml)
    ("medical", "saves/llamafactory/medical/GLM-4-9B-0414/eaft", {}, False),  # the model its folder names
    ("medical", "saves/swift/medical/eaft/checkpoint-100", {"BASE_MODEL": "zai-org/GLM-4-9B-0414"}, False),
    ("medical", "zai-org/GLM-Z1-9B-0414", {}, True),
    ("math", "saves/llamafactory/math/eaft", {}, False),
    ("agent", "Qwen/Qwen3-4B-Instruct-2507", {}, False),
]


def test_thinking_models_are_served_with_the_reasoning_parser():
    """One rule from the model family: a thinking model's server separates the reasoning (vLLM's
    deepseek_r1 parser) and its evaluation checks that it does; nothing else filters the answers."""
    run = RECIPES / "eval" / "run_eval.sh"
    for domain, path, env, thinking in THINKING_CASES:
        cmds = _commands(_bash(run, domain, "r", path, "--dry-run", **env))
        evals = [c for c in cmds if "recipes/eval/evalscope_run.py" in c]
        assert evals and all(("--thinking" in c) == thinking for c in evals), (domain, path, cmds)
        serve = next(c for c in cmds if c[0] == "vllm")
        assert (_flags(serve).get("reasoning-parser") == "deepseek_r1") == thinking, (path, serve)
        assert all("filters" not in _flags(c).get("dataset-args", "") for c in evals)


def served_message(text, serve_argv):
    """The assistant message a vLLM server returns for the generated `text`. With --reasoning-parser,
    vLLM's BaseThinkingReasoningParser.extract_reasoning (vllm/reasoning/basic_parsers.py, which
    deepseek_r1 uses) drops an opening <think> and splits at the first </think>; no </think> means all
    reasoning, no content. Without a parser, the text is the content."""
    if "--reasoning-parser" not in serve_argv:
        return {"content": text}
    before, start, after = text.partition("<think>")
    text = after if start else before
    reasoning, end, content = text.partition("</think>")
    return {"reasoning_content": reasoning, "content": content or None} if end else {"reasoning_content": text}


# Scores answers with EvalScope's own code (.venv-swift): the OpenAI response -> ModelOutput path of its
# OpenAICompatibleAPI.generate, then the benchmark adapter's calculate_metrics (filters + extract_answer).
EVALSCOPE_SCORE = r"""
import json, sys
import evalscope.benchmarks  # registers the benchmarks
from evalscope.api.evaluator import TaskState
from evalscope.api.registry import get_benchmark
from evalscope.config import TaskConfig
from evalscope.models.utils.openai import chat_choices_from_openai, model_output_from_openai
from openai.types.chat import ChatCompletion

out = []
for case in json.loads(sys.stdin.read()):
    config = TaskConfig(model="m", datasets=[case["dataset"]], dataset_args=case["dataset_args"])
    bench = get_benchmark(case["dataset"], config)
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", **case["message"]}}
    completion = ChatCompletion.model_validate({"id": "c", "object": "chat.completion", "created": 0,
                                                "model": "m", "choices": [choice]})
    output = model_output_from_openai(completion, chat_choices_from_openai(completion, []))
    state = TaskState(model="m", sample=bench.record_to_sample(case["record"]), output=output, completed=True)
    score = bench.calculate_metrics(state).score
    out.append({"answer": score.extracted_prediction, "value": score.value})
print("RESULT" + json.dumps(out))
"""

# A thinking model that drafts one answer in its reasoning and gives another after </think>.
DRAFT_THEN_ANSWER = ("The hypotension points to A.\nANSWER: A\nBut the lactate rules A out; B explains both.\n"
                     "</think>\n\nANSWER: B")
DRAFT_THEN_ANSWER_ZH = "先看“他”指谁。\n答案：A\n不对，再读一遍，“他”是李四。\n</think>\n\n答案：B"
YES_THEN_NO = "Some would say yes: the effect is significant.\nYet the cohort is tiny.\n</think>\n\nno"


def _evalscope_cases(commands):
    """One case per dataset the medical row scores by extraction (IFEval needs langdetect: left out)."""
    records = {
        "med_mcqa": {"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "B"},
        "mmlu": {"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 1, "subject": "anatomy"},
        "medqa": custom.medqa_rows([{"question": "Q?", "options": dict(zip("ABCD", "abcd")), "answer_idx": "B"}])[0],
        "cluewsc": custom.cluewsc_rows([{"text": "张三打了李四，他很生气。", "label": "false",
                                         "target": {"span1_text": "张三", "span2_text": "他"}}])[0],
        "pubmedqa": {"context": "c", "question": "Q?", "answer": "yes", "reasoning": "r"},
    }
    serve = next(c for c in commands if c[0] == "vllm")
    cases = []
    for cmd in commands:
        if "recipes/eval/evalscope_run.py" not in cmd:
            continue
        flags = _flags(cmd)
        args = json.loads(flags.get("dataset-args", "{}"))
        i = cmd.index("--datasets") + 1
        for ds in itertools.takewhile(lambda a: not a.startswith("--"), cmd[i:]):
            key = args.get(ds, {}).get("subset_list", [ds])[0]
            if key not in records:
                continue
            text = {"cluewsc": DRAFT_THEN_ANSWER_ZH, "pubmedqa": YES_THEN_NO}.get(key, DRAFT_THEN_ANSWER)
            cases.append({"key": key, "dataset": ds, "dataset_args": args, "record": records[key],
                          "message": served_message(text, serve)})
    return cases


def _evalscope_python():
    found = sorted(SWIFT_VENV.glob("lib/python*/site-packages/evalscope-*.dist-info"))
    if not found:
        pytest.skip(f"SKIPPED: EvalScope is not installed in {SWIFT_VENV} (bash scripts/setup.sh swift installs it)")
    from packaging.specifiers import SpecifierSet

    version = found[-1].name[len("evalscope-"):-len(".dist-info")]
    assert version in SpecifierSet(runner.pins()["evalscope"]), f"{SWIFT_VENV}: evalscope {version} is outside the recipes' pin"
    return SWIFT_VENV / "bin" / "python"


def test_evalscope_scores_the_final_answer_of_a_thinking_model():
    """The medical row's commands, a thinking model that drafts "ANSWER: A" and answers "ANSWER: B":
    EvalScope's real adapters (MedMCQA, MMLU, MedQA and CLUEWSC through general_mcq, PubMedQA) must
    read B (no for PubMedQA). Their multiple-choice extraction reads the completion, not the filtered
    text, so only a server that keeps the reasoning apart gets this right."""
    python = _evalscope_python()
    commands = _commands(_bash(RECIPES / "eval" / "run_eval.sh", "medical", "base", "Qwen/Qwen3-4B-Thinking-2507",
                               "--dry-run"))
    cases = _evalscope_cases(commands)
    assert sorted(c["key"] for c in cases) == ["cluewsc", "med_mcqa", "medqa", "mmlu", "pubmedqa"]
    res = subprocess.run([str(python), "-c", EVALSCOPE_SCORE], input=json.dumps(cases), capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads([l for l in res.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])
    answers = {c["key"]: o for c, o in zip(cases, out)}
    for key in ("med_mcqa", "mmlu", "medqa", "cluewsc"):
        assert answers[key]["answer"] == "B" and answers[key]["value"]["acc"] == 1.0, (key, answers[key])
    assert answers["pubmedqa"]["answer"].strip() == "no" and answers["pubmedqa"]["value"]["acc"] == 0


def test_thinking_run_refuses_a_server_without_reasoning_separation():
    """evalscope_run.py --thinking asks once and stops when the reasoning comes back inside the answer."""
    mixed = {"role": "assistant", "content": "Let me think about 1 + 1"}
    separated = {"role": "assistant", "content": None, "reasoning_content": "Let me think about 1 + 1"}
    newer_vllm = {"role": "assistant", "content": None, "reasoning": "Let me think"}
    served = {}
    with teacher.serve(lambda prompt: served["message"]) as url:
        for message, ok in ((mixed, False), (separated, True), (newer_vllm, True)):
            served["message"] = message
            if ok:
                runner.check_reasoning_separated(url, "m")
            else:
                with pytest.raises(SystemExit, match="--reasoning-parser deepseek_r1"):
                    runner.check_reasoning_separated(url, "m")


# ----------------------------------------------------------------------------- 8: Hub sources, offline

def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_math_sources_read_local_files_shaped_like_the_hub(tmp_path):
    pytest.importorskip("datasets", reason="SKIPPED: needs `datasets` (installed by scripts/setup.sh)")
    assert build_data.DEFAULT_SOURCES["crossthink"][1:3] == (None, "train_math")  # default config, math split
    numina = _jsonl(tmp_path / "numina.jsonl", [
        {"problem": "1+1?", "solution": "2", "answer": "2", "problem_type": "Algebra", "question_type": "math-word-problem",
         "source": "olympiads", "synthetic": False},
        {"problem": "Prove x.", "solution": "...", "answer": "proof", "problem_type": "Algebra",
         "question_type": "proof", "source": "olympiads", "synthetic": False}])
    bigmath = _jsonl(tmp_path / "bigmath.jsonl", [
        {"problem": "2+3?", "answer": "5", "source": "cn_k12", "domain": ["Mathematics"], "llama8b_solve_rate": 0.5}])
    crossthink = _jsonl(tmp_path / "crossthink.jsonl", [
        {"data_source": "math", "prompt": [{"role": "user", "content": "Solve: 4*4?"}], "ability": "math",
         "reward_model": {"ground_truth": "16", "style": "rule"}, "meta_data": {"question": "4*4?", "index": 0}}])
    files = {"numina": str(numina), "bigmath": str(bigmath), "crossthink": str(crossthink)}
    rows = build_data.sample(build_data.DEFAULT_SOURCES, 10, 0, data_files=files)
    assert sorted((r["source"], r["question"], r["gold"]) for r in rows) == [
        ("bigmath", "2+3?", "5"), ("crossthink", "4*4?", "16"), ("numina", "1+1?", "2")]  # the proof is dropped
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "1"}])
    only = {"crossthink": build_data.DEFAULT_SOURCES["crossthink"]}
    with pytest.raises(KeyError, match="meta_data.question"):
        build_data.sample(only, 10, 0, data_files={"crossthink": str(bad)})
    with pytest.raises(ValueError, match="unknown sources"):
        build_data.sample(only, 10, 0, data_files={"nope": str(bad)})


def test_medical_and_agent_hub_sources_read_local_files(tmp_path):
    pytest.importorskip("datasets", reason="SKIPPED: needs `datasets` (installed by scripts/setup.sh)")
    o1 = tmp_path / "medical_o1_sft.json"  # the Hub config `en`: a JSON list
    o1.write_text(json.dumps([{"Question": "Q1?", "Complex_CoT": "c1", "Response": "R1"},
                              {"Question": "Q2?", "Complex_CoT": "c2", "Response": "R2"}]))
    assert medical_data.load("medical-o1", o1) == [
        {"prompt": "Q1?", "response": "<think>\nc1\n</think>\n\nR1"}, {"prompt": "Q2?", "response": "<think>\nc2\n</think>\n\nR2"}]
    tools = json.dumps([{"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}])
    glaive = tmp_path / "glaive.json"  # llamafactory/glaive_toolcall_en: {conversations, tools (a JSON string)}
    glaive.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{}"},
                                                     {"from": "observation", "value": "{}"}, {"from": "gpt", "value": "ok"}],
                                   "tools": tools}]))
    rows = agent_data.load(glaive)
    assert [agent_data.to_swift(r) for r in rows] == [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "tool_call", "content": "{}"},
        {"role": "tool_response", "content": "{}"}, {"role": "assistant", "content": "ok"}], "tools": tools}]


# ----------------------------------------------------------------------------- 9: evaluation pins

def test_evalscope_pins_live_in_one_place():
    assert runner.pins() == {"evalscope": ">=1.2.0,<1.7.1", "bfcl-eval": "==2025.10.27.1"}
    installs = []
    for path in list(RECIPES.rglob("*.sh")) + list(RECIPES.rglob("*.md")) + list(RECIPES.rglob("*.py")):
        for line in path.read_text().splitlines():
            if re.search(r"pip install.*(evalscope|bfcl)", line, re.I) and "-r recipes/eval/requirements.txt" not in line:
                installs.append((path.name, line))
    assert not installs, f"install evalscope/bfcl-eval only via recipes/eval/requirements.txt: {installs}"
    assert "pip install -r recipes/eval/requirements.txt" in (RECIPES / "README.md").read_text()
    assert "pip install -r recipes/eval/requirements.txt" in (RECIPES / "eval" / "run_eval.sh").read_text()

    def versions(**v):
        return lambda dist: v[dist.replace("-", "_")]

    runner.check_versions(["pubmedqa"], versions(evalscope="1.7.0"))
    runner.check_versions(["bfcl_v3"], versions(evalscope="1.2.0", bfcl_eval="2025.10.27.1"))
    for bad in ("1.7.1", "1.1.0"):
        with pytest.raises(SystemExit, match="outside >=1.2.0,<1.7.1"):
            runner.check_versions(["pubmedqa"], versions(evalscope=bad))
    with pytest.raises(SystemExit, match="bfcl-eval"):
        runner.check_versions(["bfcl_v3"], versions(evalscope="1.7.0", bfcl_eval="2025.6.1"))


# ----------------------------------------------------------------------------- 10: AIME repeats

def test_aime_is_averaged_over_repeated_samples():
    run = RECIPES / "eval" / "run_eval.sh"
    for env, k in (({}, "8"), ({"AIME_REPEATS": "16"}, "16")):
        evals = [c for c in _commands(_bash(run, "math", "base", "Qwen/Qwen3-4B-Instruct-2507", "--dry-run", **env))
                 if "recipes/eval/evalscope_run.py" in c]
        aime = [c for c in evals if "aime24" in c]
        assert len(aime) == 1 and _flags(aime[0])["repeats"] == k
        i = aime[0].index("--datasets")
        assert aime[0][i + 1:i + 3] == ["aime24", "aime25"] and aime[0][i + 3].startswith("--")
        assert all("--repeats" not in c for c in evals if c is not aime[0])  # nothing else is repeated
    res = _bash(run, "math", "base", "m", "--dry-run", AIME_REPEATS="0")
    assert res.returncode == 2 and "AIME_REPEATS" in res.stderr


def _aime_report(dataset, score, num):
    metric = {"name": "acc", "num": num, "score": score, "macro_score": score, "categories": []}
    return {"name": f"m@{dataset}", "dataset_name": dataset, "model_name": "m", "score": score, "metrics": [metric], "num": num}


def test_collect_states_samples_per_problem(tmp_path, capsys):
    for run, num in (("base", 240), ("eaft", 30)):
        for ds in ("aime24", "aime25"):
            p = tmp_path / run / "20260101_000000" / "reports" / run / f"{ds}.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(_aime_report(ds, 0.5, num)))
    assert collect.main([str(tmp_path), "--domain", "math"]) == 0
    out = capsys.readouterr()
    md = (tmp_path / "table.md").read_text()
    assert "base aime24: mean of 8 samples per problem" in md and "eaft aime25: mean of 1 samples per problem" in md
    assert "warning: eaft aime24 scored from 1 samples per problem" in out.err and "warning: base" not in out.err


# ----------------------------------------------------------------------------- 11: output names

def test_outputs_are_named_after_their_source(tmp_path, shared_data):
    src = shared_data / "medical" / "pubmedqa_ori_pqal.json"
    assert medical_data.main(["--source", "pubmedqa", "--input", str(src), "--limit", "3", "--out-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pubmedqa_eval_smoke_first3.json", "pubmedqa_eval_smoke_first3.jsonl"]
    with pytest.raises(SystemExit):
        medical_data.main(["--source", "medqa", "--input", str(shared_data / "medical" / "medqa_test.jsonl"),
                           "--name", medical_data.NAME, "--out-dir", str(tmp_path)])
    assert not (tmp_path / f"{medical_data.NAME}.json").exists()
    assert medical_data.output_name("medical-o1") == medical_data.NAME == "medical_o1_reasoning_en"
    assert medical_data.output_name("medical-o1", limit=500) == "medical_o1_reasoning_en_first500"

    pytest.importorskip("datasets", reason="SKIPPED: needs `datasets` (installed by scripts/setup.sh)")
    demo = shared_data / "toolcall" / "glaive_toolcall_en_demo.json"
    out = tmp_path / "agent"
    assert agent_data.main(["--input", str(demo), "--limit", "2", "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["glaive_toolcall_en_demo_first2.json", "glaive_toolcall_en_demo_first2.jsonl"]
    assert agent_data.output_name(None) == "glaive_toolcall_en"
    assert agent_data.output_name(None, 100) == "glaive_toolcall_en_first100"


def test_medical_o1_from_a_local_file_is_named_after_it(tmp_path):
    """--input X --limit N of the training source: not the training file's name, which the recipes
    train on (a part of the set, or another file, would silently replace it)."""
    pytest.importorskip("datasets", reason="SKIPPED: needs `datasets` (installed by scripts/setup.sh)")
    src = tmp_path / "o1_sample.json"
    src.write_text(json.dumps([{"Question": f"Q{i}?", "Complex_CoT": "c", "Response": "R"} for i in range(3)]))
    out = tmp_path / "out"
    assert medical_data.main(["--input", str(src), "--limit", "2", "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["o1_sample_first2.json", "o1_sample_first2.jsonl"]
    assert medical_data.main(["--input", str(src), "--out-dir", str(out), "--name", medical_data.NAME]) == 0
    assert len(json.loads((out / f"{medical_data.NAME}.json").read_text())) == 3  # asked for by name: allowed


# ----------------------------------------------------------------------------- 12: multi-node address

@pytest.mark.parametrize("launcher", ["llamafactory", "swift_deepspeed", "swift_megatron"])
def test_multi_node_requires_master_addr(launcher):
    script = RECIPES / "math" / f"{launcher}.sh"
    for addr in (None, "127.0.0.1", "localhost", "0.0.0.0", "::"):  # a wildcard is no address to connect to
        env = {"NNODES": "2"} if addr is None else {"NNODES": "2", "MASTER_ADDR": addr}
        res = _bash(script, "eaft", "--dry-run", **env)
        assert res.returncode == 2 and "NNODES=2 needs MASTER_ADDR" in res.stderr, (addr, res.stderr)
    assert _bash(script, "eaft", "--dry-run", NNODES="2", MASTER_ADDR="10.0.0.1").returncode == 0
    assert _bash(script, "eaft", "--dry-run").returncode == 0  # one node: loopback is fine


# ----------------------------------------------------------------------------- 13: template follows the model

def _last(script, *args, **env):
    cmds = _commands(_bash(script, *args, **env))
    return cmds[-1]


def test_template_follows_the_model():
    for d in ("math", "medical", "agent"):
        hp = generate.load_hparams(d)
        assert generate.llamafactory_config(hp, "sft")["template"] == models.lookup(hp["model"], "llamafactory")
        argv = _last(RECIPES / d / "swift_deepspeed.sh", "sft", "--dry-run")
        assert _flags(argv)["template"] == models.lookup(hp["model"], "swift")
    assert models.lookup("Qwen/Qwen3-4B-Thinking-2507", "llamafactory") == "qwen3"
    assert models.lookup("Qwen/Qwen3-4B-Instruct-2507", "swift") == "qwen3_nothinking"

    glm = "zai-org/GLM-4-32B-0414"
    argv = _last(RECIPES / "math" / "llamafactory.sh", "eaft", "--dry-run", "--", f"model_name_or_path={glm}")
    assert "template=glm4" in argv
    for launcher in ("swift_deepspeed", "swift_megatron"):
        argv = _last(RECIPES / "math" / f"{launcher}.sh", "eaft", "--dry-run", "--", "--model", glm)
        assert _flags(argv)["template"] == "glm4"
        res = _bash(RECIPES / "math" / f"{launcher}.sh", "eaft", "--dry-run", "--", "--model", "org/Unknown-7B")
        assert res.returncode == 2 and "no chat template known for model 'org/Unknown-7B'" in res.stderr
    res = _bash(RECIPES / "math" / "llamafactory.sh", "eaft", "--dry-run", "--", "model_name_or_path=org/Unknown-7B")
    assert res.returncode == 2 and "no chat template known" in res.stderr


def _output_dir(launcher, *extra):
    argv = _last(RECIPES / "math" / f"{launcher}.sh", "eaft", "--dry-run", "--", *extra)
    if launcher != "llamafactory":
        return _flags(argv)["output_dir"]
    given = [a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")]
    return given[-1] if given else generate.llamafactory_config(generate.load_hparams("math"), "eaft")["output_dir"]


def test_output_folders_name_the_model():
    """A GLM-4 run and the Qwen run of the same recipe never share saves/<framework>/<domain>/<method>."""
    for launcher, saves in (("llamafactory", "llamafactory"), ("swift_deepspeed", "swift"), ("swift_megatron", "megatron")):
        qwen = _output_dir(launcher)
        glm = _output_dir(launcher, *(["model_name_or_path=zai-org/GLM-4-9B-0414"] if launcher == "llamafactory"
                                      else ["--model", "zai-org/GLM-4-9B-0414"]))
        assert qwen == f"saves/{saves}/math/Qwen3-4B-Instruct-2507/eaft", launcher
        assert glm == f"saves/{saves}/math/GLM-4-9B-0414/eaft", launcher
    assert _output_dir("llamafactory", "model_name_or_path=zai-org/GLM-4-9B-0414", "output_dir=/mine") == "/mine"


def test_template_names_exist_in_both_frameworks():
    if SITE is None:
        pytest.skip("SKIPPED: ms-swift is not installed (scripts/setup.sh installs it)")
    lf = (SITE / "llamafactory" / "data" / "template.py").read_text()
    sw = (SITE / "swift" / "template" / "constant.py").read_text()
    for _, lf_t, sw_t, _ in models.FAMILIES:
        assert f'name="{lf_t}",' in lf, lf_t
        assert f"    {sw_t} = '{sw_t}'" in sw, sw_t


def test_glm_32b_pipeline_stages_split_61_layers():
    if SITE is None:
        pytest.skip("SKIPPED: ms-swift is not installed (scripts/setup.sh installs it)")
    megatron_args = (SITE / "swift" / "megatron" / "arguments" / "megatron_args.py").read_text()
    assert "decoder_first_pipeline_num_layers: Optional[int]" in megatron_args
    env = {"TP": "8", "PP": "2", "NNODES": "2", "MASTER_ADDR": "10.0.0.1"}
    flags = _flags(_last(RECIPES / "math" / "swift_megatron.sh", "eaft", "--dry-run", "--", "--model",
                         "zai-org/GLM-4-32B-0414", **env))
    first = int(flags["decoder_first_pipeline_num_layers"])
    assert first == 31 and (61 - first) % (int(flags["pipeline_model_parallel_size"]) - 1) == 0
    flags = _flags(_last(RECIPES / "math" / "swift_megatron.sh", "eaft", "--dry-run", **env))  # 36 layers divide
    assert "decoder_first_pipeline_num_layers" not in flags


# ----------------------------------------------------------------------------- 14: truncation, retries

def test_both_frameworks_truncate_overlong_examples_the_same_way():
    """LLaMA-Factory always truncates (cutoff_len); ms-swift's default `delete` would drop the example.
    The launchers pass --truncation_strategy right: both keep the prompt and the response's start."""
    pytest.importorskip("llamafactory", reason="SKIPPED: needs LLaMA-Factory (scripts/setup.sh)")
    import torch
    from llamafactory.data.processor.processor_utils import infer_seqlen
    from swift.template.base import Template

    for d in ("math", "medical", "agent"):
        for launcher in ("swift_deepspeed", "swift_megatron"):
            assert _flags(_last(RECIPES / d / f"{launcher}.sh", "eaft", "--dry-run"))["truncation_strategy"] == "right"
    max_len, prompt, response = 16384, 100, 20000
    lf_source, lf_target = infer_seqlen(prompt, response, max_len)
    fake = type("T", (), {"placeholder_tokens": [], "max_length": max_len})()
    ids = list(range(prompt + response))
    labels = [-100] * prompt + ids[prompt:]
    kept, kept_labels = Template._truncate(fake, ids, labels, {}, truncation_strategy="right")
    assert (lf_source, lf_target) == (prompt, max_len - prompt)
    assert kept == ids[:max_len]  # the same tokens LLaMA-Factory keeps: whole prompt, response's first part
    assert sum(1 for l in kept_labels if l != -100) == lf_target
    assert torch.is_tensor(torch.tensor(kept))


def test_with_retries_backs_off_then_raises():
    waits, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("connection reset")
        return "ok"

    assert build_data.with_retries(flaky, retries=4, backoff=0.5, sleep=waits.append) == "ok"
    assert waits == [0.5, 1.0]
    with pytest.raises(OSError):
        build_data.with_retries(lambda: (_ for _ in ()).throw(OSError("down")), retries=2, backoff=1, sleep=waits.append)


def test_generate_retries_and_keeps_what_succeeded(tmp_path):
    seen, dead = {}, {"q3"}

    def reply(prompt):  # each prompt fails its first request with 500; `dead` prompts always fail
        q = prompt.split("\n\n")[0]
        n = seen[q] = seen.get(q, 0) + 1
        return None if n == 1 or q in dead else f"\\boxed{{{q}}}"

    with teacher.serve(reply) as url:
        prompts = [{"id": f"p{i}", "question": f"q{i}", "gold": str(i)} for i in range(6)]
        out = tmp_path / "responses.jsonl"
        kw = dict(base_url=url, model="t", workers=3, timeout=10, retries=2, backoff=0.01)
        assert build_data.generate(prompts, out, **kw) == (5, 1)
        rows = [json.loads(l) for l in out.read_text().splitlines()]
        assert sorted(r["id"] for r in rows) == ["p0", "p1", "p2", "p4", "p5"]
        assert seen["q3"] == 3 and seen["q0"] == 2  # 1 + 2 retries; 1 failure + success
        dead.clear()
        assert build_data.generate(prompts, out, **kw) == (1, 0)  # a rerun asks only for the missing one
        assert sorted(json.loads(l)["id"] for l in out.read_text().splitlines()) == [f"p{i}" for i in range(6)]


# ----------------------------------------------------------------------------- 15: splits and metrics the paper's numbers allow

TIES = (ROUND_HALF_UP, ROUND_HALF_DOWN)


def _printed(n):
    """Every one-decimal percentage some k/n prints as: rounded once, or first to EvalScope's 4 decimals
    of the fraction; a tie may go either way at each step."""
    out = set()
    for k in range(n + 1):
        exact = Decimal(100 * k) / Decimal(n)
        stored = {exact} | {exact.quantize(Decimal("0.01"), rounding=r) for r in TIES}
        out |= {float(x.quantize(Decimal("0.1"), rounding=r)) for x in stored for r in TIES}
    return out


def test_attainability_agrees_with_brute_force():
    grid = [round(0.1 * i, 1) for i in range(1001)]
    for n in (30, 304, 541):
        printed = _printed(n)
        assert [attainable.attainable(p, n) for p in grid] == [p in printed for p in grid], n
    # a mean of per-prompt fractions: every choice of followed instructions, enumerated
    per_prompt = {1: 2, 2: 1, 3: 1}
    denominators = [d for d, count in per_prompt.items() for _ in range(count)]
    means = {sum(Fraction(k, d) for k, d in zip(ks, denominators)) / len(denominators)
             for ks in itertools.product(*[range(d + 1) for d in denominators])}
    expected = {p for p in grid if any(abs(Fraction(str(p)) - 100 * m) <= Fraction(11, 200) for m in means)}
    assert {p for p in grid if attainable.attainable_mean(p, per_prompt)} == expected


def test_ifeval_instruction_counts_are_the_datasets(shared_data):
    rows = [json.loads(l) for l in (shared_data / "general" / "ifeval_input_data.jsonl").read_text().splitlines()]
    assert dict(collections.Counter(len(r["instruction_id_list"]) for r in rows)) == attainable.IFEVAL_INSTRUCTIONS_PER_PROMPT


def test_published_scores_are_the_papers_twelve_rows():
    assert len(attainable.published("CLUEWSC")) == len(attainable.published("IFEval")) == 12
    assert [v for _, v in attainable.base_rows("IFEval")] == [81.0, 85.0]


def test_defaults_are_the_split_and_metric_the_paper_allows(tmp_path):
    """CLUEWSC: 304-item dev set cannot give 9 of the 12 published scores, FewCLUE's 976-item public test
    can; IFEval: neither prompt-level (k/541) nor pooled instruction-level (k/834) gives them all."""
    assert not attainable.consistent("CLUEWSC", "clue_dev")
    assert attainable.consistent("CLUEWSC", custom.CLUEWSC_SPLIT)
    assert not attainable.consistent("IFEval", "prompt_level_strict")
    assert not attainable.consistent("IFEval", "inst_level_pooled")
    assert attainable.consistent("IFEval", collect.DEFAULT_METRIC["ifeval"])
    # collect.py reads that metric unless told otherwise
    metrics = [{"name": n, "num": 541, "score": v, "macro_score": v, "categories": []}
               for n, v in (("prompt_level_strict", 0.75), ("inst_level_strict", 0.81))]
    report = {"dataset_name": "ifeval", "model_name": "m", "score": 0.75, "metrics": metrics}
    path = tmp_path / "base" / "20260101_000000" / "reports" / "base" / "ifeval.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(report))
    assert collect.read_run(tmp_path / "base", collect.DEFAULT_METRIC)[("ifeval", None)] == 0.81
    assert collect.main([str(tmp_path), "--domain", "math"]) == 0
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert float(rows[0]["IFEval"]) == pytest.approx(81.0)


def test_cluewsc_download_is_pinned(tmp_path):
    """prepare_custom.py's CLUEWSC file: FewCLUE's test_public, refused unless its SHA-256 is the pinned one."""
    assert custom.CLUEWSC_URL.endswith("/datasets/cluewsc/test_public.json") and "FewCLUE/" in custom.CLUEWSC_URL
    rows = [{"text": "张三打了李四，他很生气。", "label": "true", "target": {"span1_text": "李四", "span2_text": "他"}},
            {"text": "x", "label": "false", "target": {"span1_text": "a", "span2_text": "b"}}]
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    medqa = tmp_path / "medqa.jsonl"
    medqa.write_text(json.dumps({"question": "Q?", "options": {"A": "a", "B": "b"}, "answer_idx": "B"}) + "\n")
    with teacher.static(data) as url:
        assert custom.download(url, hashlib.sha256(data).hexdigest()) == data.decode()
        with pytest.raises(SystemExit, match="SHA-256"):
            custom.download(url, custom.CLUEWSC_SHA256)
        old_sha, custom.CLUEWSC_SHA256 = custom.CLUEWSC_SHA256, hashlib.sha256(data).hexdigest()
        try:
            assert custom.main(["--medqa", str(medqa), "--cluewsc-url", url, "--out-dir", str(tmp_path / "out")]) == 0
        finally:
            custom.CLUEWSC_SHA256 = old_sha
    written = [json.loads(l) for l in (tmp_path / "out" / "cluewsc_val.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in written] == ["A", "B"]


def test_docs_hold_the_attainability_table():
    text = (ROOT / "docs" / "evaluation.md").read_text()
    assert attainable.table() in text, "docs/evaluation.md: paste the output of python recipes/eval/attainable.py"


# ----------------------------------------------------------------------------- 16: one command per row

# The rows of each domain's table in the paper (math: all seven of its table; collect.py lists them).
ROW_METHODS = {d: tuple(collect.paper_rows(d)) for d in ("math", "medical", "agent")}


def _stages(domain, method, **env):
    """{stage: [argv, ...]} of recipes/row.sh's dry run, in order."""
    res = _bash(RECIPES / "row.sh", domain, method, "--dry-run", **env)
    assert res.returncode == 0, res.stderr
    stages, current = {}, None
    for line in res.stdout.splitlines():
        if line.startswith("# "):
            current = line[2:].split(" ")[0]
            stages[current] = []
        elif line.startswith("+ "):
            stages[current].append(shlex.split(line[2:].rstrip("&")))
    return stages


@pytest.mark.parametrize("domain", ["math", "medical", "agent"])
def test_one_command_per_row_from_data_to_table(domain):
    hp = generate.load_hparams(domain)
    assert ROW_METHODS["math"] == ("base", "sft", "sft_kl", "flow", "dft", "talr", "eaft")
    for method in ROW_METHODS[domain]:
        stages = _stages(domain, method)
        expected = ["eval-data", "eval", "collect"] if method == "base" else ["data", "train", "eval-data", "eval", "collect"]
        assert list(stages) == expected, (domain, method, stages)
        (evaluate,) = stages["eval"]
        assert evaluate[:2] == ["bash", "recipes/eval/run_eval.sh"] and evaluate[2:4] == [domain, method]
        assert stages["collect"] == [["python", "recipes/eval/collect.py", "--domain", domain, f"results/{domain}", "--paper"]]
        if method == "base":
            assert evaluate[4] == hp["model"]
            continue
        (train,) = stages["train"]
        assert train == ["bash", f"recipes/{domain}/llamafactory.sh", method]
        # the checkpoint evaluated is the one this training writes
        assert evaluate[4] == generate.llamafactory_config(hp, method)["output_dir"]
        for argv in stages["train"] + stages["eval"]:  # each stage's own dry run works
            assert _bash(ROOT / argv[1], *argv[2:], "--dry-run").returncode == 0, argv
    if domain == "math":  # the paper's teacher, served here unless TEACHER_URL is given
        data = _stages("math", "sft")["data"]
        assert data[0][:3] == ["vllm", "serve", "Qwen/Qwen3-235B-A22B-Instruct-2507"]
        assert _flags(data[1])["model"] == "Qwen/Qwen3-235B-A22B-Instruct-2507"
        data = _stages("math", "sft", TEACHER_URL="http://10.0.0.9:8000/v1")["data"]
        assert len(data) == 1 and _flags(data[0])["base-url"] == "http://10.0.0.9:8000/v1"


def test_rows_under_ms_swift_evaluate_their_own_output():
    for framework in ("swift_deepspeed", "swift_megatron"):
        stages = _stages("agent", "eaft", FRAMEWORK=framework)
        (train,) = stages["train"]
        assert train == ["bash", f"recipes/agent/{framework}.sh", "eaft"]
        out = _flags(_last(ROOT / train[1], *train[2:], "--dry-run"))["output_dir"]
        assert stages["eval"][0][4] == out  # run_eval.sh takes its last checkpoint-N
    res = _bash(RECIPES / "row.sh", "math", "eaft", "--dry-run", FRAMEWORK="trl")
    assert res.returncode == 2 and "FRAMEWORK must be" in res.stderr
    # the math baselines are rows of the math table only; each row's ms-swift launcher is swift sft's
    res = _bash(RECIPES / "row.sh", "medical", "talr", "--dry-run")
    assert res.returncode == 2 and "METHOD must be one of: base sft dft eaft eaft_hard" in res.stderr
    for method in ("sft_kl", "flow", "talr"):
        (train,) = _stages("math", method, FRAMEWORK="swift_deepspeed")["train"]
        assert train == ["bash", "recipes/math/swift_deepspeed.sh", method]
        assert _flags(_last(ROOT / train[1], *train[2:], "--dry-run"))["loss_type"] == method


def test_readme_gives_each_row_its_command_and_cost():
    text = (RECIPES / "README.md").read_text()
    section = text[text.index("## One command per row"):]
    section = section[:section.index("\n## ", 1)]
    for domain in ("math", "medical", "agent"):
        for method in ROW_METHODS[domain]:
            assert f"bash recipes/row.sh {domain} {method}" in section, (domain, method)
    for stage in ("data", "train", "eval"):
        assert f"| {stage}" in section
    assert "Qwen3-235B-A22B-Instruct-2507" in section and "H100" in section
    assert "recipes/README.md#one-command-per-row" in (ROOT / "docs" / "reproduction.md").read_text()


def test_readme_glm_wording_is_sourced():
    """The paper's tables are Qwen3-4B only; the authors' README says the experiments span Qwen and GLM
    (4B-32B) and publishes no GLM setting: the recipes' GLM layouts are ours."""
    text = (RECIPES / "README.md").read_text()
    assert "The paper's GLM runs" not in text and "use the same recipes with another model" not in text
    assert "Qwen and GLM series (4B-32B parameters)" in text and "not the paper's" in text
