"""The paper-reproduction recipes (recipes/): generated files in sync, launchers, the frameworks'
own argument parsers on every config, data building and result collection, and (e2e) one real
CPU run per domain with the model swapped for SmolLM2-135M."""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import teacher

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
DOMAINS = ("math", "medical", "agent")
LAUNCHERS = ("llamafactory", "swift_deepspeed", "swift_megatron")
_SWIFT_SPEC = importlib.util.find_spec("swift")
SITE = Path(_SWIFT_SPEC.origin).parents[1] if _SWIFT_SPEC else Path("/nonexistent")  # site-packages


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


generate = _load("recipes_generate", RECIPES / "generate.py")
METHODS = generate.METHOD_NAMES  # every domain's
MATH_TABLE = ("sft", "sft_kl", "flow", "dft", "talr", "eaft")  # the paper's math rows that train (and base)
BASELINES = ("sft_kl", "flow", "talr")  # eaft-plugins' other losses: swift sft and LLaMA-Factory, not megatron sft


def domain_methods(domain):
    return generate.methods(generate.load_hparams(domain))


def _loss_keys():
    """Keys a method may set (the frameworks' switches and every key of eaft-plugins' methods); everything else in
    a domain's YAMLs must be identical across methods."""
    from eaft_plugins.options import ALL_METHOD_KEYS, METHODS as LOSSES

    return {"use_dft_loss", *(f"use_{m}_loss" for m in LOSSES), *ALL_METHOD_KEYS}


LOSS_KEYS = _loss_keys()
build_data = _load("recipes_math_build_data", RECIPES / "math" / "build_data.py")
medical_data = _load("recipes_medical_prepare", RECIPES / "medical" / "prepare_data.py")
agent_data = _load("recipes_agent_prepare", RECIPES / "agent" / "prepare_data.py")
collect = _load("recipes_eval_collect", RECIPES / "eval" / "collect.py")
custom = _load("recipes_eval_custom", RECIPES / "eval" / "prepare_custom.py")


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    for k in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "TP", "PP", "ZERO_CONFIG"):
        env.pop(k, None)
    env.update(extra)
    return env


def dry_run(domain, launcher, method, *extra, **env):
    """(env assignments, argv) of the command a launcher prints with --dry-run."""
    res = subprocess.run(["bash", str(RECIPES / domain / f"{launcher}.sh"), method, "--dry-run", *extra],
                         capture_output=True, text=True, env=_env(**env), timeout=60)
    assert res.returncode == 0, res.stderr
    lines = [l[2:] for l in res.stdout.splitlines() if l.startswith("+ ")]
    assert lines[0] == f"cd {ROOT}"
    words = shlex.split(lines[1])
    envs = {}
    while "=" in words[0] and not words[0].startswith("-"):
        k, v = words.pop(0).split("=", 1)
        envs[k] = v
    return envs, words


def flag_dict(args):
    """--flag value pairs (last one wins, as argparse does)."""
    out = {}
    for i, a in enumerate(args):
        if a.startswith("--"):
            out[a[2:]] = args[i + 1]
    return out


# ----------------------------------------------------------------------------- generated files

def test_generated_files_are_in_sync():
    stale = generate.stale_files()
    assert not stale, f"run `python recipes/generate.py`: stale {[str(p.relative_to(ROOT)) for p in stale]}"


def _shared(cfg, method):
    """A YAML less its loss keys and its own output folder (SFT-KL: its ZeRO-2 config read as the domain's,
    checked apart)."""
    out = {k: v for k, v in cfg.items() if k not in LOSS_KEYS and k != "output_dir"}
    if method == "sft_kl":
        out["deepspeed"] = "recipes/common/ds_z3_config.json"
    return out


@pytest.mark.parametrize("domain", DOMAINS)
def test_methods_differ_only_in_the_loss(domain):
    methods = domain_methods(domain)
    assert set(METHODS) <= set(methods)
    cfgs = {m: yaml.safe_load((RECIPES / domain / "llamafactory" / f"{m}.yaml").read_text()) for m in methods}
    shared = {m: _shared(c, m) for m, c in cfgs.items()}
    assert all(s == shared["sft"] for s in shared.values())
    assert all(c["output_dir"].endswith(f"/{m}") for m, c in cfgs.items())
    hp = yaml.safe_load((RECIPES / domain / "hparams.yaml").read_text())
    sft = cfgs["sft"]
    assert sft["learning_rate"] == 1e-5 and sft["num_train_epochs"] == 10 and sft["lr_scheduler_type"] == "cosine"
    assert 0.05 <= sft["warmup_ratio"] <= 0.1 and sft["optim"] == "adamw_torch"
    assert sft["per_device_train_batch_size"] * sft["gradient_accumulation_steps"] * 8 == hp["global_batch_size"] == 64
    assert not (set(cfgs["sft"]) & LOSS_KEYS)
    assert cfgs["dft"]["use_dft_loss"] is True
    for m, gate in (("eaft", "soft"), ("eaft_hard", "hard")):
        assert cfgs[m]["use_eaft_loss"] is True and cfgs[m]["eaft_gate"] == gate
        assert cfgs[m]["eaft_topk"] == 20 and cfgs[m]["eaft_alpha"] == 1.0 and cfgs[m]["eaft_entropy_norm"] == "ln_k"
    assert cfgs["eaft_hard"]["eaft_h_min"] == hp["eaft"]["h_min"] and cfgs["eaft_hard"]["eaft_p_min"] == hp["eaft"]["p_min"]
    assert (ROOT / sft["deepspeed"]).is_file()
    assert json.loads((ROOT / sft["deepspeed"]).read_text())["zero_optimization"]["stage"] == 3
    info = json.loads((ROOT / sft["dataset_dir"] / "dataset_info.json").read_text())
    assert sft["dataset"] in info


def test_math_has_every_row_of_the_paper_table():
    """The math table's six trained rows (+ the ablation) from the one hparams.yaml, each with its loss switch and
    keys only; SFT-KL also with ZeRO-2 (its frozen starting model cannot be copied from ZeRO-3 shards)."""
    hp = generate.load_hparams("math")
    assert generate.methods(hp) == (*MATH_TABLE[:-1], "eaft", "eaft_hard")
    cfgs = {m: yaml.safe_load((RECIPES / "math" / "llamafactory" / f"{m}.yaml").read_text()) for m in MATH_TABLE}
    loss = {m: {k: v for k, v in c.items() if k in LOSS_KEYS} for m, c in cfgs.items()}
    assert loss["sft"] == {} and loss["dft"] == {"use_dft_loss": True}
    assert loss["sft_kl"] == {"use_sft_kl_loss": True, "sft_kl_beta": 0.5, "sft_kl_direction": "forward",
                              "sft_kl_log_metrics": True}
    assert loss["flow"] == {"use_flow_loss": True, "flow_tau": "median", "flow_log_metrics": True}
    assert loss["talr"] == {"use_talr_loss": True, "talr_tau": "median", "talr_min_weight": 0.01,
                            "talr_log_metrics": True}
    assert loss["eaft"]["use_eaft_loss"] is True
    zero = {m: json.loads((ROOT / c["deepspeed"]).read_text())["zero_optimization"]["stage"] for m, c in cfgs.items()}
    assert zero == {**{m: 3 for m in MATH_TABLE}, "sft_kl": 2}
    # the values are the options' own defaults (the papers'), written out so the recipe reads top to bottom
    from eaft_plugins.options import FLOWOptions, SFTKLOptions, TALROptions

    assert (SFTKLOptions().beta, SFTKLOptions().direction) == (0.5, "forward")
    assert FLOWOptions().tau is None and TALROptions().tau is None and TALROptions().min_weight == 0.01


# ----------------------------------------------------------------------------- launchers

def test_launchers_pass_bash_n():
    scripts = sorted(RECIPES.rglob("*.sh"))
    assert len(scripts) >= 3 * 3 + 4
    for s in scripts:
        res = subprocess.run(["bash", "-n", str(s)], capture_output=True, text=True)
        assert res.returncode == 0, f"{s}: {res.stderr}"


@pytest.mark.parametrize("domain", DOMAINS)
def test_dry_run_commands(domain):
    hp = yaml.safe_load((RECIPES / domain / "hparams.yaml").read_text())
    for method in domain_methods(domain):
        envs, argv = dry_run(domain, "llamafactory", method)
        assert envs == {"FORCE_TORCHRUN": "1", "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500", "NPROC_PER_NODE": "8"}
        assert argv == ["llamafactory-cli", "train", f"recipes/{domain}/llamafactory/{method}.yaml",
                        f"gradient_accumulation_steps={64 // hp['per_device_batch_size'] // 8}"]

        loss = {"sft": {}, "dft": {"enable_dft_loss": "true"},
                "eaft": {"loss_type": "eaft", "eaft_topk": "20", "eaft_alpha": "1.0", "eaft_gate": "soft"},
                "eaft_hard": {"loss_type": "eaft", "eaft_gate": "hard", "eaft_h_min": "0.15", "eaft_p_min": "0.1"},
                "sft_kl": {"loss_type": "sft_kl", "sft_kl_beta": "0.5", "sft_kl_direction": "forward"},
                "flow": {"loss_type": "flow", "flow_tau": "median"},
                "talr": {"loss_type": "talr", "talr_tau": "median", "talr_min_weight": "0.01"}}[method]
        for launcher, head in (("swift_deepspeed", ["swift", "sft"]), ("swift_megatron", ["megatron", "sft"])):
            if launcher == "swift_megatron" and method in BASELINES:
                continue  # refused (test_megatron_refuses_the_baselines)
            envs, argv = dry_run(domain, launcher, method)
            assert envs["NNODES"] == "1" and envs["NPROC_PER_NODE"] == "8" and "MASTER_ADDR" in envs
            assert argv[:2] == head
            flags = flag_dict(argv[2:])
            assert flags["model"] == hp["model"] and flags["dataset"] == hp["swift_dataset"]
            assert float(flags["lr" if launcher == "swift_megatron" else "learning_rate"]) == 1e-5
            assert flags["num_train_epochs"] == "10" and flags["max_length"] == str(hp["max_length"])
            assert {k: flags.get(k) for k in loss} == loss
            if method == "sft":
                assert not any(k.startswith("eaft") or k in ("loss_type", "enable_dft_loss") for k in flags)
            if method != "dft":
                assert "enable_dft_loss" not in flags
            if launcher == "swift_deepspeed":
                assert flags["deepspeed"] == generate.zero_config(hp, method)
                assert int(flags["gradient_accumulation_steps"]) * 8 * hp["per_device_batch_size"] == 64
            else:
                assert flags["global_batch_size"] == "64"
                assert flags["tensor_model_parallel_size"] == str(hp["megatron_tp"])
                assert flags["pipeline_model_parallel_size"] == str(hp["megatron_pp"])


def test_dry_run_multi_node_and_overrides():
    envs, argv = dry_run("math", "llamafactory", "eaft", "--", "model_name_or_path=/m", "template=chatml", NNODES="2",
                         NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="6000")
    assert envs["NNODES"] == "2" and envs["NODE_RANK"] == "1" and envs["MASTER_ADDR"] == "10.0.0.1"
    assert argv[-4:] == ["gradient_accumulation_steps=4", "output_dir=saves/llamafactory/math/m/eaft",  # 64 / (1 x 16 GPUs)
                         "model_name_or_path=/m", "template=chatml"]  # another model writes to its own folder

    envs, argv = dry_run("math", "swift_deepspeed", "eaft", "--", "--model", "/m", "--template", "chatml", NNODES="4",
                         MASTER_ADDR="10.0.0.1")
    flags = flag_dict(argv[2:])
    assert flags["gradient_accumulation_steps"] == "2" and flags["model"] == "/m"  # extra args come last
    assert flags["template"] == "chatml"
    envs, argv = dry_run("math", "swift_deepspeed", "sft", ZERO_CONFIG="recipes/common/ds_z3_offload_config.json")
    assert flag_dict(argv[2:])["deepspeed"] == "recipes/common/ds_z3_offload_config.json"

    envs, argv = dry_run("agent", "swift_megatron", "eaft", TP="8", PP="2", NNODES="2", MASTER_ADDR="10.0.0.1")
    flags = flag_dict(argv[2:])
    assert flags["tensor_model_parallel_size"] == "8" and flags["pipeline_model_parallel_size"] == "2"
    assert flags["sequence_parallel"] == "true"
    _, argv = dry_run("agent", "swift_megatron", "eaft", TP="1")
    assert flag_dict(argv[2:])["sequence_parallel"] == "false"


@pytest.mark.parametrize("method", BASELINES)
def test_megatron_refuses_the_baselines(method):
    """eaft-plugins wires only EAFT into `megatron sft`: the launcher says so before starting anything, and names
    the launchers that run the method. Its DFT is ms-swift's own flag, which MegatronSftArguments has."""
    res = subprocess.run(["bash", str(RECIPES / "math" / "swift_megatron.sh"), method, "--dry-run"],
                         capture_output=True, text=True, env=_env(), timeout=60)
    assert res.returncode == 2 and "+ " not in res.stdout
    assert f"has no --loss_type {method}" in res.stderr and "recipes/math/swift_deepspeed.sh" in res.stderr
    _, argv = dry_run("math", "swift_megatron", "dft")
    assert flag_dict(argv[2:])["enable_dft_loss"] == "true"


def test_loss_md_states_every_key_of_the_baselines():
    """docs/loss.md's sections on the recipes' baselines are hand-written (doc_tables generates EAFT's tables only):
    every key of SFT-KL, FLOW and TALR, with its default, and the fused rule of each, as eaft_plugins.options has
    them."""
    from eaft_plugins.options import METHOD_SETTINGS, METHODS as LOSSES

    text = (ROOT / "docs" / "loss.md").read_text()
    for method in BASELINES:
        assert f"use_{method}_loss: true" in text and f"--loss_type {method}" in text and f'loss_type="{method}"' in text
        for setting in METHOD_SETTINGS[method]:
            if setting.group == "loss":
                assert f"`{setting.key}` (default `{setting.default_text}`" in text, setting.key
        fused = f"**Fused:** `{method}_fused: true`" if LOSSES[method].fused else f"`{method}_fused: true` is refused"
        assert fused in text, method


def test_swift_zero_config_follows_the_method():
    _, argv = dry_run("math", "swift_deepspeed", "sft_kl")
    assert flag_dict(argv[2:])["deepspeed"] == "recipes/common/ds_z2_config.json"
    _, argv = dry_run("math", "swift_deepspeed", "sft_kl", ZERO_CONFIG="recipes/common/ds_z3_offload_config.json")
    assert flag_dict(argv[2:])["deepspeed"] == "recipes/common/ds_z3_offload_config.json"  # the user's wins


def test_launcher_errors():
    def rc(*args, **env):
        res = subprocess.run(["bash", str(RECIPES / "math" / "swift_megatron.sh"), *args], capture_output=True,
                             text=True, env=_env(**env), timeout=60)
        return res.returncode, res.stderr

    code, err = rc("bogus", "--dry-run")
    assert code == 2 and "METHOD must be one of: sft sft_kl flow dft talr eaft eaft_hard" in err
    code, err = rc("eaft", "--dry-run", TP="3")
    assert code == 2 and "not divisible" in err
    code, err = rc("eaft", "--dry-run", NPROC_PER_NODE="3", TP="1")
    assert code == 2 and "GLOBAL_BATCH_SIZE=64" in err
    code, err = rc("--dry-run")
    assert code == 2 and "usage" in err


# ----------------------------------------------------------------------------- framework parsers

LF_PARSE = r"""
import json, sys, yaml
from llamafactory.hparams import get_train_args
out = {}
for path, overrides in json.loads(sys.argv[1]).items():
    cfg = yaml.safe_load(open(path))
    cfg.update(overrides)
    model, data, train, ft, gen = get_train_args(cfg)
    config = getattr(ft, "eaft_config", None)  # eaft-plugins' loss config of the method that is on
    out[path] = {"ft": {k: getattr(ft, k, None) for k in sys.argv[2].split(",")},
                 "method": None if config is None else config.method,
                 "lr": train.learning_rate, "ga": train.gradient_accumulation_steps,
                 "epochs": train.num_train_epochs, "cutoff": data.cutoff_len, "template": data.template,
                 "dataset": data.dataset, "scheduler": getattr(train.lr_scheduler_type, "value", str(train.lr_scheduler_type))}
print("RESULT" + json.dumps(out))
"""


def _result(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.e2e
def test_llamafactory_parses_every_yaml(smollm2_dir, tmp_path):
    # Overrides only what CPU parsing needs: the local model, no DeepSpeed (needs torchrun +
    # GPUs), no bf16 (CPU), a scratch output_dir. Loss keys and hyperparameters are untouched.
    jobs = {}
    for d in DOMAINS:
        for m in domain_methods(d):
            jobs[str(RECIPES / d / "llamafactory" / f"{m}.yaml")] = {
                "model_name_or_path": str(smollm2_dir), "deepspeed": None, "bf16": False,
                "output_dir": str(tmp_path / d / m)}
    res = subprocess.run([sys.executable, "-c", LF_PARSE, json.dumps(jobs), ",".join(sorted(LOSS_KEYS))],
                         capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    out = _result(res)
    for path, got in out.items():
        cfg = yaml.safe_load(Path(path).read_text())
        assert got["lr"] == cfg["learning_rate"] and got["ga"] == cfg["gradient_accumulation_steps"]
        assert got["epochs"] == cfg["num_train_epochs"] and got["cutoff"] == cfg["cutoff_len"]
        assert got["template"] == cfg["template"] and got["dataset"] == [cfg["dataset"]]
        assert got["scheduler"] == cfg["lr_scheduler_type"]
        for k in LOSS_KEYS & set(cfg):
            assert got["ft"][k] == cfg[k], (path, k, got["ft"][k], cfg[k])
        method = Path(path).stem
        if "eaft" not in method:
            assert not got["ft"]["use_eaft_loss"]
        # the loss that runs is the file's: eaft-plugins' method, or none of ours (sft; dft: LLaMA-Factory's own)
        assert got["method"] == {"eaft_hard": "eaft", "sft": None, "dft": None}.get(method, method), path
        assert bool(got["ft"]["use_dft_loss"]) == (method == "dft")


SWIFT_PARSE = r"""
import dataclasses, json, sys
from swift.arguments import SftArguments
from swift.utils import parse_args
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    args, remaining = parse_args(SftArguments, argv)
    ta = args.training_args
    config = getattr(ta, "eaft_config", None)
    opts = None if config is None else config.options
    fields = [f.name for f in dataclasses.fields(opts) if f.name not in ("ignore_index", "chunk_size")] if opts else []
    out[name] = {"remaining": remaining, "loss_type": args.loss_type, "dft": args.enable_dft_loss,
                 "lr": ta.learning_rate, "ga": ta.gradient_accumulation_steps, "epochs": ta.num_train_epochs,
                 "max_length": args.max_length, "tuner_type": args.tuner_type,
                 "method": None if config is None else config.method,
                 "options": None if opts is None else {k: getattr(opts, k) for k in fields}}
print("RESULT" + json.dumps(out))
"""


def _swift_argv(domain, method, smollm2_dir, tmp_path):
    _, argv = dry_run(domain, "swift_deepspeed", method)
    args = argv[2:]
    i = args.index("--deepspeed")
    del args[i:i + 2]  # DeepSpeed is not installed here (GPU-only); parsed without it
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}) + "\n")
    # The local SmolLM2 needs its model type / template named; CPU has no bf16.
    return args + ["--model", str(smollm2_dir), "--model_type", "llama", "--template", "chatml",
                   "--torch_dtype", "float32", "--dataset", str(data), "--output_dir", str(tmp_path / f"{domain}-{method}")]


@pytest.mark.e2e
def test_swift_sft_arguments_parse_every_launcher(smollm2_dir, tmp_path):
    jobs = {f"{d}/{m}": _swift_argv(d, m, smollm2_dir, tmp_path) for d in DOMAINS for m in domain_methods(d)}
    res = subprocess.run([sys.executable, "-c", SWIFT_PARSE, json.dumps(jobs)], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=600)
    out = _result(res)
    for name, got in out.items():
        domain, method = name.split("/")
        hp = yaml.safe_load((RECIPES / domain / "hparams.yaml").read_text())
        assert got["remaining"] == []
        assert got["lr"] == 1e-5 and got["epochs"] == 10 and got["tuner_type"] == "full"
        assert got["ga"] == 8 and got["max_length"] == hp["max_length"]
        if method.startswith("eaft"):
            assert got["loss_type"] == "eaft" and got["method"] == "eaft"
            assert got["options"] == {"topk": 20, "alpha": 1.0, "gate": "soft" if method == "eaft" else "hard",
                                      "entropy_norm": "ln_k", "h_min": 0.15, "p_min": 0.1, "weight_norm": "none"}
        elif method in BASELINES:  # parsed by eaft-plugins into the method's options ("median": tau None)
            assert got["loss_type"] == method and got["method"] == method
            assert got["options"] == {"sft_kl": {"beta": 0.5, "direction": "forward"}, "flow": {"tau": None},
                                      "talr": {"tau": None, "min_weight": 0.01}}[method]
        else:
            assert got["loss_type"] is None and got["options"] is None
        assert got["dft"] == (method == "dft")


_SOURCES: dict = {}


def _find_class(name: str) -> Path:
    """The ms-swift source file that defines class `name` (read as text, not imported)."""
    if not _SOURCES:
        for f in (SITE / "swift").rglob("*.py"):
            _SOURCES[f] = f.read_text(errors="replace")
    hits = [f for f, text in _SOURCES.items() if re.search(rf"^class {name}\b", text, re.M)]
    assert len(hits) == 1, f"class {name}: found in {hits}"
    return hits[0]


def _dataclass_fields(name: str) -> dict:
    """{field: annotation source} of an ms-swift dataclass and its bases, from the installed source
    (MegatronSftArguments cannot be imported without transformer_engine, which is GPU-only)."""
    tree = ast.parse(_SOURCES.get(_find_class(name)) or _find_class(name).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    fields = {}
    for base in reversed(cls.bases):
        fields.update(_dataclass_fields(ast.unparse(base)))
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            fields[node.target.id] = ast.unparse(node.annotation)
    return fields


def _literal_choices(annotation: str):
    m = re.search(r"Literal\[(.*?)\]", annotation)
    return None if m is None else [v for v in ast.literal_eval(f"[{m.group(1)}]")]


def test_megatron_flags_are_megatron_sft_arguments_fields():
    """Every flag of the Megatron launchers is a field of ms-swift's MegatronSftArguments (or one of
    the --eaft_* fields the swift_megatron plugin adds), and Literal-typed values are allowed choices."""
    path = SITE / "swift" / "megatron" / "arguments" / "sft_args.py"
    if not path.is_file():
        pytest.skip(f"SKIPPED: ms-swift's Megatron arguments not found at {path}")
    fields = _dataclass_fields("MegatronSftArguments")
    assert {"loss_type", "tensor_model_parallel_size", "global_batch_size", "enable_dft_loss", "model"} <= set(fields)
    from eaft_plugins.options import KEYS  # the --eaft_* keys the swift plugin adds to MegatronSftArguments

    plugin_flags = set(KEYS)
    for d in DOMAINS:
        for m in METHODS:
            _, argv = dry_run(d, "swift_megatron", m)
            for flag, value in flag_dict(argv[2:]).items():
                if flag.startswith("eaft_"):
                    assert flag in plugin_flags, f"--{flag}: not an EAFT key (eaft_plugins.options.KEYS)"
                    continue
                assert flag in fields, f"megatron sft has no --{flag}"
                choices = _literal_choices(fields[flag])
                if choices is not None:
                    assert value in [str(c) for c in choices], f"--{flag} {value}: not in {choices}"


def test_megatron_sft_arguments_import_for_real():
    try:
        from swift.megatron.arguments import MegatronSftArguments  # noqa: F401
    except Exception as exc:  # transformer_engine / GPU stack absent
        pytest.skip(f"SKIPPED: swift.megatron.arguments cannot be imported here ({exc!r}); "
                    "the Megatron flags were checked against the installed source instead")
    from swift.utils import parse_args
    _, argv = dry_run("math", "swift_megatron", "eaft")
    args, remaining = parse_args(MegatronSftArguments, argv[2:])
    assert remaining == [] and args.loss_type == "eaft"


# ----------------------------------------------------------------------------- math data building

def _gsm8k(shared_data, n):
    rows = [json.loads(l) for l in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:n]]
    assert len(rows) == n
    return rows


def test_math_filter_keeps_exactly_the_verified(shared_data):
    pytest.importorskip("math_verify", reason="SKIPPED: needs `pip install math-verify` (see recipes/README.md)")
    rows = []
    for i, r in enumerate(_gsm8k(shared_data, 30)):
        gold = r["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
        work = r["answer"].rsplit("####", 1)[0]
        if i % 3 == 0:
            response = f"{work}The answer is $\\boxed{{{gold}}}$."
        elif i % 3 == 1:
            response = f"{work}The answer is $\\boxed{{{int(gold) + 7}}}$."
        else:
            response = ""  # truncated generation
        rows.append({"id": f"g{i}", "gold": gold, "prompt": r["question"], "response": response})
    rows.append(dict(rows[0]))  # a second correct answer to the same prompt: kept once
    kept = build_data.filter_rows(rows)
    assert [r["id"] for r in kept] == [f"g{i}" for i in range(0, 30, 3)]
    assert len(build_data.filter_rows(rows, keep=4, seed=1)) == 4
    # symbolic equivalence, not string match
    assert build_data.is_correct("\\frac{1}{2}", "so it is \\boxed{0.5}")
    assert not build_data.is_correct("\\frac{1}{2}", "so it is \\boxed{0.6}")


def test_math_build_data_end_to_end_with_local_endpoint(shared_data, tmp_path):
    pytest.importorskip("math_verify", reason="SKIPPED: needs `pip install math-verify` (see recipes/README.md)")
    gsm = _gsm8k(shared_data, 12)
    answers, correct = {}, set()
    for i, r in enumerate(gsm):
        gold = r["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
        wrong = i % 2 == 1
        answers[r["question"].strip()] = f"Work.\nThe answer is \\boxed{{{int(gold) + 1 if wrong else gold}}}."
        if not wrong:
            correct.add(r["question"].strip())
    calls = []

    def reply(prompt):
        calls.append(prompt)
        return answers[prompt.split("\n\n")[0]]

    with teacher.serve(reply) as url:
        src = tmp_path / "gsm.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in gsm))
        common = ["--work-dir", str(tmp_path / "work"), "--source", f"gsm8k=local:{src}:question:answer",
                  "--per-source", "12", "--base-url", url, "--workers", "2", "--timeout", "30",
                  "--out-dir", str(tmp_path / "out")]
        assert build_data.main(["all", *common]) == 0
        assert len(calls) == 12
        assert all(c.endswith(build_data.INSTRUCTION) for c in calls)
        assert build_data.main(["generate", *common]) == 0  # resumable: nothing left to ask
        assert len(calls) == 12
    prompts = [json.loads(l) for l in (tmp_path / "work" / "prompts.jsonl").read_text().splitlines()]
    assert sorted(p["gold"] for p in prompts) == sorted(r["answer"].rsplit("####", 1)[-1].strip().replace(",", "") for r in gsm)
    lf = json.loads((tmp_path / "out" / "eaft_math_19k.json").read_text())
    assert {r["instruction"].split("\n\n")[0] for r in lf} == correct
    assert all(r["input"] == "" and "\\boxed" in r["output"] for r in lf)
    sw = [json.loads(l) for l in (tmp_path / "out" / "eaft_math_19k.jsonl").read_text().splitlines()]
    assert [m["messages"][1]["content"] for m in sw] == [r["output"] for r in lf]


# ----------------------------------------------------------------------------- medical / agent / eval data

def test_medical_and_agent_converters(shared_data):
    med = [json.loads(l) for l in (shared_data / "medical" / "medqa_test.jsonl").read_text().splitlines()[:5]]
    rows = medical_data.from_medqa(med)
    for src, row in zip(med, rows):
        assert src["question"] in row["prompt"] and row["response"].startswith("<think>\n")
        assert row["response"].endswith(f"The answer is {src['answer_idx']}.")
    o1 = medical_data.from_medical_o1([{"Question": "Q?", "Complex_CoT": " think ", "Response": "A."}])
    assert o1 == [{"prompt": "Q?", "response": "<think>\nthink\n</think>\n\nA."}]

    convs = json.loads((shared_data / "toolcall" / "glaive_toolcall_en_demo.json").read_text())[:20]
    roles = {"human": "user", "gpt": "assistant", "function_call": "tool_call", "observation": "tool_response"}
    for c in convs:
        out = agent_data.to_swift(c)
        assert [m["role"] for m in out["messages"]] == [roles[t["from"]] for t in c["conversations"]]
        assert [m["content"] for m in out["messages"]] == [t["value"] for t in c["conversations"]]
        assert json.loads(out["tools"]) == json.loads(c["tools"])
    with pytest.raises(ValueError, match="unknown sharegpt role"):
        agent_data.to_swift({"conversations": [{"from": "robot", "value": "x"}]})

    mcq = custom.medqa_rows(med)
    assert [r["answer"] for r in mcq] == [m["answer_idx"] for m in med]
    assert all(r[k] == m["options"][k] for r, m in zip(mcq, med) for k in "ABCD")
    wsc = custom.cluewsc_rows([{"text": "张三打了李四，他很生气。", "label": "true", "target": {"span1_text": "李四", "span2_text": "他"}},
                               {"text": "x", "label": 1, "target": {"span1_text": "a", "span2_text": "b"}}])
    assert [r["answer"] for r in wsc] == ["A", "B"] and "“他”指代的是“李四”" in wsc[0]["question"]


# ----------------------------------------------------------------------------- result collection

def _report(dataset, score, subsets=None, metric="mean_acc", extra_metrics=()):
    """An EvalScope report JSON (evalscope/report/report.py Report.to_dict)."""
    subsets = subsets or {"default": score}
    cat = {"name": ["default"], "num": 10 * len(subsets), "score": score, "macro_score": score,
           "subsets": [{"name": n, "score": s, "num": 10, "is_aggregate": False} for n, s in subsets.items()]}
    metrics = [{"name": metric, "num": cat["num"], "score": score, "macro_score": score, "categories": [cat]}]
    metrics += [{"name": n, "num": 10, "score": s, "macro_score": s, "categories": []} for n, s in extra_metrics]
    return {"name": f"model@{dataset}", "dataset_name": dataset, "dataset_pretty_name": dataset.upper(),
            "dataset_description": "", "model_name": "model", "score": score, "metrics": metrics,
            "analysis": "N/A", "perf_metrics": None, "num": cat["num"]}


def _write_run(root, run, stamp, reports):
    for rep in reports:
        p = root / run / stamp / "reports" / run / f"{rep['dataset_name']}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(rep))


def test_collect_builds_the_paper_table(tmp_path):
    scores = {  # run -> aime24, aime25, gsm8k, mmlu, ifeval, cluewsc
        "base": [0.633, 0.474, 0.943, 0.771, 0.810, 0.852],
        "sft": [0.633, 0.500, 0.948, 0.765, 0.795, 0.745],
        "eaft": [0.600, 0.533, 0.945, 0.766, 0.801, 0.837],
    }
    for run, s in scores.items():
        _write_run(tmp_path, run, "20260101_000000", [
            _report("aime24", 0.0), _report("aime25", s[1]), _report("gsm8k", s[2]), _report("mmlu", s[3]),
            # collect.py reads IFEval's inst_level_strict, not the report's first metric
            _report("ifeval", s[4] - 0.05, metric="prompt_level_strict", extra_metrics=[("inst_level_strict", s[4])]),
            _report("general_mcq", s[5], subsets={"cluewsc": s[5]})])
        _write_run(tmp_path, run, "20260102_000000", [_report("aime24", s[0])])  # a later re-run wins
    (tmp_path / "notes").mkdir()  # folders without reports are ignored
    assert collect.main([str(tmp_path), "--domain", "math"]) == 0
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "table.csv").open())}
    assert list(rows) == ["base", "sft", "eaft"]
    for run, s in scores.items():
        target = 100 * (s[0] + s[1] + s[2]) / 3
        general = 100 * (s[3] + s[4] + s[5]) / 3
        base_t = 100 * sum(scores["base"][:3]) / 3
        base_g = 100 * sum(scores["base"][3:]) / 3
        r = rows[run]
        assert math.isclose(float(r["AIME24"]), 100 * s[0], abs_tol=1e-3)
        assert math.isclose(float(r["CLUEWSC"]), 100 * s[5], abs_tol=1e-3)
        assert math.isclose(float(r["target_avg"]), target, abs_tol=1e-3)
        assert math.isclose(float(r["general_avg"]), general, abs_tol=1e-3)
        assert math.isclose(float(r["target_avg_delta"]), target - base_t, abs_tol=1e-3)
        assert math.isclose(float(r["general_avg_delta"]), general - base_g, abs_tol=1e-3)
    md = (tmp_path / "table.md").read_text()
    assert md.splitlines()[0] == "| Method | AIME24 | AIME25 | GSM8K | Math Avg. | MMLU | IFEval | CLUEWSC | General Avg. |"
    assert "| sft | 63.3 | 50.0 | 94.8 | 69.4 (+1.0) | 76.5 | 79.5 | 74.5 | 76.8 (-4.3) |" in md

    # another metric on request; a missing benchmark leaves its average empty, never a partial mean
    assert collect.main([str(tmp_path), "--domain", "math", "--metric", "ifeval=prompt_level_strict",
                         "--out-csv", str(tmp_path / "t2.csv"), "--out-md", str(tmp_path / "t2.md")]) == 0
    r2 = {r["method"]: r for r in csv.DictReader((tmp_path / "t2.csv").open())}
    assert math.isclose(float(r2["base"]["IFEval"]), 100 * (0.810 - 0.05), abs_tol=1e-3)
    assert collect.main([str(tmp_path), "--domain", "medical", "--out-csv", str(tmp_path / "m.csv"),
                         "--out-md", str(tmp_path / "m.md")]) == 0
    rm = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert all(r["MedMCQA"] == "" and r["target_avg"] == "" for r in rm) and rm[0]["general_avg"] != ""


def test_collect_builds_the_whole_math_table_in_the_papers_order(tmp_path, capsys):
    """Seven runs (the folders recipes/row.sh writes) -> the paper's seven math rows in its order, whatever order the
    folders were made in; the ablation after them; a missing row is named."""
    rows = collect.paper_rows("math")
    assert rows == ["base", *MATH_TABLE]
    assert [f"+ {collect.TITLES[m]}" for m in rows[1:]] == list(collect.PAPER["math"])[1:]
    made = [*reversed(rows), "eaft_hard"]
    for i, run in enumerate(made):
        s = 0.40 + 0.05 * i
        _write_run(tmp_path, run, "20260101_000000", [
            _report("aime24", s), _report("aime25", s), _report("gsm8k", s), _report("mmlu", s),
            _report("ifeval", s, metric="prompt_level_strict", extra_metrics=[("inst_level_strict", s)]),
            _report("general_mcq", s, subsets={"cluewsc": s})])
    assert collect.main([str(tmp_path), "--domain", "math", "--paper"]) == 0
    table = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert [r["method"] for r in table] == [*rows, "eaft_hard"]
    base = 100 * (0.40 + 0.05 * made.index("base"))
    for r in table:
        s = 100 * (0.40 + 0.05 * made.index(r["method"]))
        assert math.isclose(float(r["target_avg"]), s, abs_tol=1e-3)
        assert math.isclose(float(r["general_avg_delta"]), s - base, abs_tol=1e-3)
    md = (tmp_path / "table.md").read_text().splitlines()
    assert [l.split(" | ")[0][2:] for l in md[2:2 + 8]] == [*rows, "eaft_hard"]
    assert sum(l.startswith("| paper: ") for l in md) == 7
    assert "without results" not in capsys.readouterr().err

    shutil.rmtree(tmp_path / "flow")
    assert collect.main([str(tmp_path), "--domain", "math"]) == 0
    err = capsys.readouterr().err
    assert "rows of the paper's math table without results under" in err and ": flow (bash recipes/row.sh" in err
    assert [r["method"] for r in csv.DictReader((tmp_path / "table.csv").open())] == [
        m for m in [*rows, "eaft_hard"] if m != "flow"]


def test_readme_states_the_paper_numbers_and_scale():
    text = (RECIPES / "README.md").read_text()
    for domain, rows in collect.PAPER.items():
        for name, vals in rows.items():
            assert f"{vals[-1]:.1f}" in text, (domain, name)
    for delta in ("-4.6", "-1.0", "-4.8", "-1.6", "-6.3", "-3.6"):
        assert delta in text
    assert "GPU-hours" in text and "nothing here has been run at full scale" in text
    for d in DOMAINS:
        for launcher in LAUNCHERS:
            assert f"recipes/{d}/{launcher}.sh" in text or f"{launcher}.sh" in text


# ----------------------------------------------------------------------------- e2e: real CPU runs

def _smoke_data(domain, shared_data, data_dir: Path) -> str:
    """Write the domain's local smoke data where the recipe's dataset_info.json expects it; return
    the dataset name to train on."""
    info = json.loads((RECIPES / domain / "data" / "dataset_info.json").read_text())
    (data_dir / "dataset_info.json").parent.mkdir(parents=True, exist_ok=True)
    (data_dir / "dataset_info.json").write_text(json.dumps(info))  # the recipe's own registration
    gen = data_dir / "generated"
    if domain == "math":
        from eaft_plugins.tools.mathgen import generate as mathgen, write_alpaca

        write_alpaca(mathgen(16, seed=0), gen / "eaft_math_19k.json")
        return "eaft_math_19k"
    if domain == "medical":
        src = shared_data / "medical" / "pubmedqa_ori_pqal.json"
        if not src.is_file():
            pytest.skip(f"SKIPPED: needs {src}")
        # the training name on purpose, in a scratch folder: the CLI refuses it for an evaluation set
        medical_data.write_outputs(medical_data.load("pubmedqa", src)[:16], gen, medical_data.NAME)
        return "medical_o1_reasoning_en"
    src = shared_data / "toolcall" / "glaive_toolcall_en_demo.json"
    if not src.is_file():
        pytest.skip(f"SKIPPED: needs {src}")
    agent_data.write_outputs(json.loads(src.read_text())[:16], gen, agent_data.NAME)
    return "glaive_toolcall_en_local"  # the Hub entry's offline twin in the same dataset_info.json


# (domain, method, the metric that shows the method ran, its bounds)
CPU_RUNS = [(d, "eaft", "eaft/weight", (0.0, 1.0)) for d in DOMAINS] + [
    ("math", "sft_kl", "sft_kl/kl", (0.0, math.inf)),
    ("math", "flow", "flow/weight", (0.0, 1.0)),
    ("math", "talr", "talr/weight", (0.0, 1.0)),
]


@pytest.mark.e2e
@pytest.mark.parametrize("domain,method,metric,bounds", CPU_RUNS, ids=[f"{d}-{m}" for d, m, _, _ in CPU_RUNS])
def test_recipe_trains_for_real_on_cpu(domain, method, metric, bounds, smollm2_dir, shared_data, tmp_path):
    """The domain's recipe of a method through `llamafactory-cli train`, 2 steps, model swapped for SmolLM2 (every
    domain's EAFT; the math table's eaft-plugins baselines)."""
    cfg = yaml.safe_load((RECIPES / domain / "llamafactory" / f"{method}.yaml").read_text())
    loss_keys = {k: v for k, v in cfg.items() if k in LOSS_KEYS}
    data_dir = tmp_path / "data"
    dataset = _smoke_data(domain, shared_data, data_dir)
    cfg.update({  # the CPU-scale override; loss keys and optimiser settings stay the recipe's
        "model_name_or_path": str(smollm2_dir), "template": "chatml", "dataset_dir": str(data_dir), "dataset": dataset,
        "deepspeed": None, "bf16": False, "max_steps": 2, "cutoff_len": 160, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1, "output_dir": str(tmp_path / "out"), "save_strategy": "no",
        "logging_steps": 1, "preprocessing_num_workers": None, "dataloader_num_workers": 0, "plot_loss": False,
        "warmup_ratio": 0.0,
    })
    assert {k: v for k, v in cfg.items() if k in LOSS_KEYS} == loss_keys
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = Path(sys.executable).parent / "llamafactory-cli"
    res = subprocess.run([str(cli), "train", str(path)], capture_output=True, text=True, cwd=ROOT,
                         env=_env(), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    logs = [h for h in state["log_history"] if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in logs)
    # the method really ran: the plugin's per-step metrics are there, in their bounds
    values = [h[metric] for h in state["log_history"] if metric in h]
    assert values, f"no {metric} logged; log_history={state['log_history']}"
    low, high = bounds
    assert all(low <= v <= high for v in values) and (method == "sft_kl" or all(v > 0 for v in values))
