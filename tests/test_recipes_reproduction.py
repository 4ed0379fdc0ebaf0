"""Issue #12 ("a reproduction you can trust"): thinking answers, Hub sources offline, evaluation pins,
AIME repeats, output names, multi-node address, template per model, truncation and teacher retries."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
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
generate = _load("repro_generate", RECIPES / "generate.py")


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

def test_answer_after_think_on_canned_responses():
    # Thinking-2507: the template opened <think> in the prompt, so the output has no opening tag
    assert runner.answer_after_think("The study shows yes, but no...\n</think>\n\nmaybe") == "maybe"
    assert runner.answer_after_think("<think>\nyes? no?\n</think>\n\nAnswer: no") == "Answer: no"
    assert runner.answer_after_think("reasoning that says yes and never ends") == ""  # no answer at all
    assert runner.answer_after_think("") == ""


def test_think_filter_goes_into_every_dataset():
    args = ["eval", "--model", "m", "--datasets", "pubmedqa", "ifeval", "--dataset-args",
            json.dumps({"ifeval": {"filters": {"remove_until": "x"}}}), "--limit", "3"]
    out = runner.evalscope_argv(args, thinking=True)
    assert out.count("--dataset-args") == 1 and out[out.index("--limit") + 1] == "3"
    ds_args = json.loads(out[out.index("--dataset-args") + 1])
    assert list(ds_args["pubmedqa"]["filters"]) == [runner.FILTER_NAME]
    assert list(ds_args["ifeval"]["filters"]) == [runner.FILTER_NAME, "remove_until"]  # ours first
    assert runner.evalscope_argv(args, thinking=False) == args


def test_thinking_is_one_rule_from_the_model_family():
    run = RECIPES / "eval" / "run_eval.sh"
    cases = [  # (domain, model path, env) -> thinking
        ("medical", "Qwen/Qwen3-4B-Thinking-2507", {}, True),
        ("medical", "saves/llamafactory/medical/eaft", {}, True),  # checkpoint: its base (hparams.yaml)
        ("medical", "saves/swift/medical/eaft/checkpoint-100", {"BASE_MODEL": "zai-org/GLM-4-9B-0414"}, False),
        ("medical", "zai-org/GLM-Z1-9B-0414", {}, True),
        ("math", "saves/llamafactory/math/eaft", {}, False),
        ("agent", "Qwen/Qwen3-4B-Instruct-2507", {}, False),
    ]
    for domain, path, env, thinking in cases:
        cmds = _commands(_bash(run, domain, "r", path, "--dry-run", **env))
        evals = [c for c in cmds if "recipes/eval/evalscope_run.py" in c]
        assert evals and all(("--thinking" in c) == thinking for c in evals), (domain, path, cmds)
        serve = next(c for c in cmds if c[0] == "vllm")
        assert "--reasoning-parser" not in serve  # the answer filter is the one place the rule lives


def test_think_filter_registers_in_evalscope():
    if importlib.util.find_spec("evalscope") is None:
        pytest.skip("SKIPPED: evalscope is not installed here (pip install -r recipes/eval/requirements.txt); "
                    "the filter's rule is tested above, its EvalScope registration is not")
    from evalscope.api.filter import build_filter_ensemble

    runner.register_filter()
    ens = build_filter_ensemble(filters={runner.FILTER_NAME: None})
    assert ens("yes yes</think>\nno") == "no" and ens("yes, unfinished") == ""


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pubmedqa_eval_smoke.json", "pubmedqa_eval_smoke.jsonl"]
    with pytest.raises(SystemExit):
        medical_data.main(["--source", "medqa", "--input", str(shared_data / "medical" / "medqa_test.jsonl"),
                           "--name", medical_data.NAME, "--out-dir", str(tmp_path)])
    assert not (tmp_path / f"{medical_data.NAME}.json").exists()
    assert medical_data.output_name("medical-o1") == medical_data.NAME == "medical_o1_reasoning_en"

    pytest.importorskip("datasets", reason="SKIPPED: needs `datasets` (installed by scripts/setup.sh)")
    demo = shared_data / "toolcall" / "glaive_toolcall_en_demo.json"
    out = tmp_path / "agent"
    assert agent_data.main(["--input", str(demo), "--limit", "2", "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["glaive_toolcall_en_demo.json", "glaive_toolcall_en_demo.jsonl"]
    assert agent_data.output_name(None) == "glaive_toolcall_en"


# ----------------------------------------------------------------------------- 12: multi-node address

@pytest.mark.parametrize("launcher", ["llamafactory", "swift_deepspeed", "swift_megatron"])
def test_multi_node_requires_master_addr(launcher):
    script = RECIPES / "math" / f"{launcher}.sh"
    for addr in (None, "127.0.0.1", "localhost"):
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
