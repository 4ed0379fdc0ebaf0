"""The LLaMA-Factory plugin through the real parser and the real `llamafactory-cli train`, on SmolLM2."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from eaft_plugins import EAFTOptions
from eaft_plugins.tools.demo import cli_env, run_train, train_config, write_dataset, write_yaml
from eaft_plugins.options import FLOWOptions, SFTKLOptions, TALROptions
from frameworks import (Run, check_method_steps, ddp_config, first_batch_reference, lf_train, method_first_batch,
                        save_with_tokenizer, tiny_llama)

llamafactory = pytest.importorskip("llamafactory", reason="SKIPPED: llamafactory is not installed in this environment")
from llamafactory.hparams import get_train_args  # noqa: E402

from eaft_plugins.integrations import llamafactory as plugin  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("lf_data"), 24, seed=1)


def parse(model_dir, data_dir, tmp_path, **overrides):
    cfg = train_config(model_dir, data_dir, tmp_path / "out", steps=1, **overrides)
    return get_train_args(cfg)


# ---------------------------------------------------------------- parser (no training)


def test_keys_parse_into_options(smollm2_dir, data_dir, tmp_path):
    *_, finetuning_args, _ = parse(
        smollm2_dir, data_dir, tmp_path, eaft_topk=10, eaft_alpha=0.5, eaft_gate="hard", eaft_h_min=0.3,
        eaft_p_min=0.2, eaft_entropy_norm="upstream", eaft_weight_norm="mean",
    )
    assert finetuning_args.eaft_options == EAFTOptions(
        topk=10, alpha=0.5, gate="hard", h_min=0.3, p_min=0.2, entropy_norm="upstream", weight_norm="mean"
    )


def test_defaults_are_the_paper_defaults(smollm2_dir, data_dir, tmp_path):
    *_, finetuning_args, _ = parse(smollm2_dir, data_dir, tmp_path)
    assert finetuning_args.eaft_options == EAFTOptions()
    *_, finetuning_args, _ = parse(smollm2_dir, data_dir, tmp_path, eaft_topk="full")
    assert finetuning_args.eaft_options.topk is None


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("eaft_gate", "sharp", r"`eaft_gate` 'sharp' is invalid: gate must be one of \['soft', 'hard', 'shuffle'\]"),
        ("eaft_topk", 1, r"`eaft_topk` 1 is invalid: topk must be an integer >= 2 or 'full'"),
        ("eaft_alpha", -1.0, r"`eaft_alpha` -1.0 is invalid: alpha must be >= 0"),
        ("eaft_entropy_norm", "log", r"`eaft_entropy_norm` 'log' is invalid: entropy_norm must be one of \['ln_k', 'upstream', 'none'\]"),
        ("eaft_weight_norm", "sum", r"`eaft_weight_norm` 'sum' is invalid: weight_norm must be one of \['none', 'mean'\]"),
        ("eaft_p_min", 2.0, r"`eaft_p_min` 2.0 is invalid: p_min must be in \[0.0, 1.0\]"),
    ],
)
def test_bad_values_name_the_key(smollm2_dir, data_dir, tmp_path, key, value, match):
    with pytest.raises(ValueError, match=match):
        parse(smollm2_dir, data_dir, tmp_path, **{key: value})


def test_eaft_key_without_use_eaft_loss_is_refused(smollm2_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"LLaMA-Factory key `eaft_topk` set but use_eaft_loss is false: EAFT settings only apply with `use_eaft_loss: true`"):
        parse(smollm2_dir, data_dir, tmp_path, eaft=False, eaft_topk=10)


def test_unknown_key_is_still_rejected(smollm2_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match="eaft_topkk"):
        parse(smollm2_dir, data_dir, tmp_path, eaft_topkk=10)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"stage": "pt"}, "stage: pt ignores the loss; EAFT needs `stage: sft`"),
        ({"use_dft_loss": True}, "`use_eaft_loss: true` and LLaMA-Factory key `use_dft_loss` both replace the loss"),
    ],
)
def test_combinations_that_would_silently_drop_eaft_are_refused(smollm2_dir, data_dir, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        parse(smollm2_dir, data_dir, tmp_path, **overrides)


@pytest.mark.parametrize(
    "args_index, attr, match",
    [  # set on parsed args: USE_MCA needs mcore_adapter and liger needs liger-kernel, GPU builds both
        (3, "use_mca", "Megatron Core Adapter"),
        (0, "enable_liger_kernel", r"`enable_liger_kernel`: the dense EAFT loss needs the full logits.*Set `eaft_fused: true`"),
    ],
)
def test_gpu_only_paths_are_refused(smollm2_dir, data_dir, tmp_path, args_index, attr, match):
    parsed = parse(smollm2_dir, data_dir, tmp_path)
    setattr(parsed[args_index], attr, True)
    model_args, _, training_args, finetuning_args, _ = parsed
    with pytest.raises(ValueError, match=match):
        plugin.check_combination(model_args, training_args, finetuning_args)


def test_liger_with_eaft_fused_is_allowed(smollm2_dir, data_dir, tmp_path):
    # Our instance-level forward replaces Liger's class-level fused CE forward; its other kernels stay.
    parsed = parse(smollm2_dir, data_dir, tmp_path, eaft_fused=True)
    parsed[0].enable_liger_kernel = True
    model_args, _, training_args, finetuning_args, _ = parsed
    plugin.check_combination(model_args, training_args, finetuning_args)
    assert finetuning_args.eaft_fused is True


def test_label_smoothing_is_refused(smollm2_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"`label_smoothing_factor` 0.1: EAFT replaces the loss, so the smoothing would "
                                         r"be dropped silently; set `label_smoothing_factor: 0`"):
        parse(smollm2_dir, data_dir, tmp_path, label_smoothing_factor=0.1)


def test_eaft_fused_without_use_eaft_loss_is_refused(smollm2_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"LLaMA-Factory key `eaft_fused` set but use_eaft_loss is false"):
        parse(smollm2_dir, data_dir, tmp_path, eaft=False, eaft_fused=True)


@pytest.mark.parametrize("alpha", [0.5, 1.0])  # written with its default value counts too
def test_upstream_key_without_use_eaft_loss_is_refused(smollm2_dir, data_dir, tmp_path, alpha):
    # eaft_alpha is upstream's field (default 1.0), so only the keys the user wrote can tell.
    with pytest.raises(ValueError, match=r"LLaMA-Factory key `eaft_alpha` set but use_eaft_loss is false"):
        parse(smollm2_dir, data_dir, tmp_path, eaft=False, eaft_alpha=alpha)


# ---- the math table's other losses: use_sft_kl_loss / use_flow_loss / use_talr_loss and their keys


@pytest.mark.parametrize("flag, keys, options", [
    ("use_sft_kl_loss", {"sft_kl_beta": 0.2, "sft_kl_direction": "reverse"}, SFTKLOptions(beta=0.2, direction="reverse")),
    ("use_sft_kl_loss", {}, SFTKLOptions()),
    ("use_flow_loss", {"flow_tau": "0.7", "flow_fused": True, "flow_log_metrics": "false"}, FLOWOptions(tau=0.7)),
    ("use_flow_loss", {"flow_tau": "median"}, FLOWOptions()),
    ("use_talr_loss", {"talr_tau": 2, "talr_min_weight": 0.0, "talr_fused": "true"}, TALROptions(tau=2.0, min_weight=0.0)),
    ("use_talr_loss", {}, TALROptions()),
])
def test_method_keys_parse_into_options(smollm2_dir, data_dir, tmp_path, flag, keys, options):
    *_, finetuning_args, _ = parse(smollm2_dir, data_dir, tmp_path, eaft=False, **{flag: True}, **keys)
    config = finetuning_args.eaft_config
    assert config.method == flag[4:-5] and config.options == options
    fused = [v for k, v in keys.items() if k.endswith("_fused")]
    assert config.fused is (bool(fused) and fused[0] in (True, "true"))
    assert config.log_metrics is ("flow_log_metrics" not in keys)


@pytest.mark.parametrize("overrides, match", [
    ({"use_flow_loss": True, "flow_tau": "fast"}, r"LLaMA-Factory key `flow_tau` 'fast' is invalid: tau must be a "
                                                   r"positive number or 'median'"),
    ({"use_flow_loss": True, "flow_tau": 0}, r"`flow_tau` 0 is invalid: tau must be a positive number or 'median', got 0.0"),
    ({"use_talr_loss": True, "talr_min_weight": 2}, r"`talr_min_weight` 2 is invalid: min_weight must be in \[0.0, 1.0\]"),
    ({"use_sft_kl_loss": True, "sft_kl_direction": "both"},
     r"`sft_kl_direction` 'both' is invalid: direction must be one of \['forward', 'reverse'\]"),
    ({"use_sft_kl_loss": True, "sft_kl_beta": -1}, r"`sft_kl_beta` -1 is invalid: beta must be >= 0"),
    ({"use_sft_kl_loss": True, "sft_kl_fused": True}, r"`sft_kl_fused` True is invalid: SFT-KL has no fused path"),
    ({"use_talr_loss": "maybe"}, r"`use_talr_loss` 'maybe' is invalid: must be true or false"),
    # keys of a method that is off, even at their default value
    ({"use_talr_loss": True, "flow_tau": "median"}, r"LLaMA-Factory key `flow_tau` set but use_flow_loss is false: "
                                                    r"FLOW settings only apply with `use_flow_loss: true`"),
    ({"talr_fused": False}, r"`talr_fused` set but use_talr_loss is false"),
    ({"use_flow_loss": True, "eaft_topk": 20}, r"`eaft_topk` set but use_eaft_loss is false"),
    ({"use_flow_loss": True, "eaft_alpha": 1.0}, r"`eaft_alpha` set but use_eaft_loss is false"),
    # two losses at once
    ({"use_flow_loss": True, "use_talr_loss": True}, r"`use_flow_loss: true`, `use_talr_loss: true`: each chooses "
                                                     r"the loss.*keep one"),
    ({"use_eaft_loss": True, "use_sft_kl_loss": True}, r"`use_eaft_loss: true`, `use_sft_kl_loss: true`"),
    ({"use_talr_loss": True, "use_dft_loss": True}, r"`use_talr_loss: true` and LLaMA-Factory key `use_dft_loss` both "
                                                    r"replace the loss"),
    # settings under which the method would not run
    ({"use_sft_kl_loss": True, "label_smoothing_factor": 0.1}, r"`label_smoothing_factor` 0.1: SFT-KL replaces the "
                                                               r"loss, so the smoothing would be dropped"),
    ({"use_flow_loss": True, "stage": "pt"}, r"stage: pt ignores the loss; FLOW needs `stage: sft`"),
    ({"use_flow_loss": True, "packing": True}, r"`use_flow_loss: true` with LLaMA-Factory key `packing`: FLOW weighs "
                                               r"each training example.*set `packing: false`"),
    ({"use_flow_loss": True, "neat_packing": True}, r"LLaMA-Factory key `neat_packing`"),
])
def test_method_settings_are_refused_naming_the_key(smollm2_dir, data_dir, tmp_path, overrides, match):
    overrides = {"eaft": False, **overrides}
    with pytest.raises(ValueError, match=match):
        parse(smollm2_dir, data_dir, tmp_path, **overrides)


@pytest.mark.parametrize("flag, fix", [("use_sft_kl_loss", r"Set `enable_liger_kernel: false`"),
                                       ("use_talr_loss", r"Set `talr_fused: true` \(fused TALR.*or `enable_liger_kernel: false`")])
def test_method_with_liger_is_refused(smollm2_dir, data_dir, tmp_path, flag, fix):
    parsed = parse(smollm2_dir, data_dir, tmp_path, eaft=False, **{flag: True})
    parsed[0].enable_liger_kernel = True
    model_args, data_args, training_args, finetuning_args, _ = parsed
    with pytest.raises(ValueError, match=rf"`{flag}: true` with LLaMA-Factory key `enable_liger_kernel`: the dense "
                                         rf".* loss needs the full logits.*{fix}"):
        plugin.check_combination(model_args, training_args, finetuning_args, data_args)


def test_written_keys_from_argv():
    argv = ["--model_name_or_path", "/m/eaft_plugins/x", "--eaft_alpha", "0.5", "--do_train", "--eaft_gate=hard"]
    assert plugin.written_keys(argv) == {"model_name_or_path": "/m/eaft_plugins/x", "eaft_alpha": "0.5",
                                         "do_train": True, "eaft_gate": "hard"}
    with pytest.raises(ValueError, match=r"LLaMA-Factory key `eaft_alpha`, LLaMA-Factory key `eaft_gate` set but use_eaft_loss is false"):
        plugin.check_written_keys(argv)
    assert plugin.check_written_keys(argv + ["--use_eaft_loss", "TRUE"]) is True
    assert plugin.check_written_keys(["--model_name_or_path", "/cache/eaft_plugins/m"]) is False


@pytest.mark.parametrize("written, fused, log_metrics", [
    ({"eaft_fused": "false", "eaft_log_metrics": "False"}, False, False),
    ({"eaft_fused": "TRUE", "eaft_log_metrics": "1"}, True, True),
    ({"eaft_fused": "0"}, False, True),
])
def test_quoted_booleans_are_parsed(smollm2_dir, data_dir, tmp_path, written, fused, log_metrics):
    *_, finetuning_args, _ = parse(smollm2_dir, data_dir, tmp_path, **written)
    assert finetuning_args.eaft_config.fused is fused and finetuning_args.eaft_fused is fused
    assert finetuning_args.eaft_config.log_metrics is log_metrics


def test_a_bad_boolean_names_the_key(smollm2_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"`eaft_fused` 'yes please' is invalid: must be true or false"):
        parse(smollm2_dir, data_dir, tmp_path, eaft_fused="yes please")


def test_quoted_false_use_eaft_loss_is_off(smollm2_dir, data_dir, tmp_path):
    cfg = train_config(smollm2_dir, data_dir, tmp_path / "out", steps=1)
    cfg["use_eaft_loss"] = "false"
    *_, finetuning_args, _ = get_train_args(cfg)
    assert finetuning_args.use_eaft_loss is False and finetuning_args.eaft_config is None


def test_v1_guard_decides_from_the_parsed_keys(smollm2_dir, data_dir, tmp_path, monkeypatch):
    import types

    launcher = types.SimpleNamespace(launch=lambda: "launched")
    plugin._patch_v1(launcher)
    # A model path under ~/.cache/eaft_plugins/ mentions "eaft", but the config does not use EAFT.
    plain = train_config(tmp_path / "eaft_plugins" / "model", data_dir, tmp_path / "o", steps=1, eaft=False)
    monkeypatch.setattr(sys, "argv", ["llamafactory-cli", "train", str(write_yaml(plain, tmp_path / "plain.yaml"))])
    assert launcher.launch() == "launched"
    monkeypatch.setattr(sys, "argv", ["llamafactory-cli", "train", str(tmp_path / "plain.yaml"), "use_eaft_loss=true"])
    with pytest.raises(ValueError, match=r"the v1 trainer \(USE_V1=1\) ignores use_eaft_loss"):
        launcher.launch()


def test_a_release_that_defines_our_keys_is_refused():
    base = llamafactory.hparams.parser.FinetuningArguments.__mro__[1]  # upstream's class
    future = dataclasses.make_dataclass("FinetuningArguments", [("eaft_topk", int, dataclasses.field(default=20))],
                                        bases=(base,))
    with pytest.raises(RuntimeError, match=r"defines \['eaft_topk'\] itself"):
        plugin.extend_finetuning_arguments(future)


@pytest.mark.e2e
def test_doctor_reports_the_patches():
    out = subprocess.run([sys.executable, "-m", "eaft_plugins", "doctor"], capture_output=True, text=True,
                         env=cli_env(), timeout=300)
    assert "llamafactory 0.9" in out.stdout
    assert "patched: hparams.finetuning_args.FinetuningArguments" in out.stdout
    assert "patched: train.sft.trainer.CustomSeq2SeqTrainer" in out.stdout


@pytest.mark.e2e
def test_bootstrap_disabled_means_no_patch():
    code = ("import dataclasses, llamafactory.hparams.parser as p; "
            "print('eaft_topk' in {f.name for f in dataclasses.fields(p.FinetuningArguments)})")
    env = dict(cli_env(), EAFT_PLUGINS_DISABLE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == "False"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert out.stdout.strip() == "True"


# ---------------------------------------------------------------- real training runs


# The retention monitor rides on the plain-SFT run (it leaves the trajectory bitwise unchanged).
RETENTION = ['{"prompt": "Name a colour."}', '{"prompt": "Say hello in French."}',
             '{"text": "The Moon is Earth\'s only natural satellite. It causes the tides."}',
             '{"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Madrid"], "answer": 0}']


def config(model_dir, data_dir, out, **overrides):
    return train_config(model_dir, data_dir, out, steps=STEPS, cutoff_len=128, **overrides)


def train(model_dir, data_dir, out, *, python=sys.executable, env=None, **overrides) -> Run:
    return lf_train(config(model_dir, data_dir, out, **overrides), python=python, env=env)


def reference_of(model_dir, data_dir, tmp_path, options=None, python=sys.executable):
    """Step 1 of a 4-row batch (one micro-batch), recomputed independently (tests/frameworks.py)."""
    return first_batch_reference(config(model_dir, data_dir, tmp_path / "unused"), 4, 4, options, python)


@pytest.fixture(scope="module")
def eaft_run(smollm2_dir, data_dir, tmp_path_factory):
    return train(smollm2_dir, data_dir, tmp_path_factory.mktemp("lf") / "eaft").steps


@pytest.fixture(scope="module")
def sft_run(smollm2_dir, data_dir, tmp_path_factory):
    """Plain SFT (no use_eaft_loss) with the retention monitor measuring every step."""
    root = tmp_path_factory.mktemp("lf")
    probe = root / "probe.jsonl"
    probe.write_text("\n".join(RETENTION) + "\n")
    return train(smollm2_dir, data_dir, root / "sft", eaft=False, retention_probe=str(probe), retention_steps=1)


@pytest.fixture(scope="module")
def reference(smollm2_dir, data_dir, tmp_path_factory):
    return reference_of(smollm2_dir, data_dir, tmp_path_factory.mktemp("lf_ref"))


@pytest.mark.e2e
def test_eaft_run_logs_metrics_every_step(eaft_run):
    assert [row["step"] for row in eaft_run] == list(range(1, STEPS + 1))
    for row in eaft_run:
        assert {"eaft/ce", "eaft/weight", "eaft/entropy", "eaft/conflict_frac"} <= set(row)
        assert 0 < row["eaft/weight"] < 1 and 0 <= row["eaft/conflict_frac"] <= 1
        assert row["loss"] < row["eaft/ce"]  # weights below 1 shrink the loss


@pytest.mark.e2e
def test_step_one_loss_is_our_core_loss(eaft_run, reference):
    first = eaft_run[0]
    assert first["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    assert first["eaft/ce"] == pytest.approx(reference["ce"], rel=1e-4)
    assert first["eaft/tokens"] == reference["tokens"]


@pytest.mark.e2e
def test_plain_sft_with_the_same_seed_differs(eaft_run, sft_run, reference):
    steps = sft_run.steps
    assert "eaft/ce" not in steps[0]
    assert steps[0]["loss"] == pytest.approx(reference["ce"], rel=1e-4)  # plain CE on the same batch
    assert abs(steps[0]["loss"] - eaft_run[0]["loss"]) > 0.05 * steps[0]["loss"]


@pytest.mark.e2e
def test_plain_sft_logs_retention_every_step(sft_run):
    """The monitor works without EAFT: step 0 (before the first update) and every step after it, in the step's
    own log entry, in retention.jsonl, and drawn in retention.png."""
    rows = [r for r in sft_run.history if "retention/kl_base" in r]
    assert [r["step"] for r in rows] == list(range(0, STEPS + 1))
    keys = ("retention/kl_base", "retention/text_nll", "retention/text_nll_delta", "retention/mc_logp",
            "retention/mc_logp_delta")
    assert all(set(keys) <= set(r) for r in rows)
    assert rows[0]["retention/kl_base"] == 0.0 and rows[0]["retention/text_nll_delta"] == 0.0
    assert rows[-1]["retention/kl_base"] > 0  # training moved the model
    assert all("loss" in r for r in rows[1:])
    lines = [json.loads(x) for x in (sft_run.out_dir / "retention.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(0, STEPS + 1))
    assert (sft_run.out_dir / "retention.png").stat().st_size > 1000
    assert "retention curves:" in sft_run.output


@pytest.mark.e2e
def test_lora_run_uses_eaft_and_eval_reports_plain_ce(smollm2_dir, data_dir, tmp_path, reference):
    history = train(smollm2_dir, data_dir, tmp_path / "lora", lora=True, eval_dataset="eaft_demo_math",
                    eval_strategy="steps", eval_steps=STEPS, per_device_eval_batch_size=4).history
    rows = [row for row in history if "loss" in row]
    assert rows[0]["loss"] == pytest.approx(reference["loss"], rel=1e-4)  # LoRA starts at the base model
    assert all("eaft/weight" in row for row in rows)
    evals = [row for row in history if "eval_loss" in row]
    assert len(evals) == 1 and "eaft/ce" not in evals[0]
    ev = evals[0]
    assert ev["eval_eaft/tokens"] == reference["all_tokens"]  # every eval token, counted once
    assert ev["eval_loss"] < ev["eval_eaft/ce"]  # eval_loss is EAFT-weighted; eval_eaft/ce is plain CE
    assert 0 < ev["eval_eaft/weight"] < 1


@pytest.fixture(scope="module")
def ddp_reference(ddp_setup, tmp_path_factory):
    """Step 1 of the shared 2-rank DDP run (tests/integrations/conftest.py), recomputed in one process: accelerate
    deals whole batches, so rank 0 holds rows 0 and 1, rank 1 rows 2 and 3, each rank's micro-batch divided by its
    own mean weight (weight_norm=mean)."""
    s = ddp_setup
    cfg = ddp_config(s["model"], s["data"], tmp_path_factory.mktemp("ddp_ref") / "unused")
    cfg.pop("ddp_backend")  # one process: no process group to start
    return first_batch_reference(cfg, 4, [[0, 1], [2, 3]])


@pytest.mark.e2e
@pytest.mark.dist
def test_two_process_torchrun_reduces_metrics_over_ranks(ddp_run, ddp_reference):
    rows = ddp_run.steps
    # Two ranks x 2 rows cover the same 4 rows as the single-process recomputation.
    assert rows[0]["eaft/tokens"] == ddp_reference["tokens"]
    assert rows[0]["eaft/ce"] == pytest.approx(ddp_reference["ce"], rel=1e-4)
    assert rows[0]["loss"] == pytest.approx(ddp_reference["loss_weight_norm"], rel=1e-4)


@pytest.mark.e2e
@pytest.mark.dist
def test_weight_norm_mean_divides_by_the_previous_steps_mean_over_ranks(ddp_run):
    rows = ddp_run.steps
    assert rows[0]["eaft/weight"] == pytest.approx(1.0, rel=1e-6)  # first step: each micro-batch its own mean
    # Later (soft weights, alpha 1): weight = entropy / the previous step's mean entropy over BOTH ranks; a divisor
    # reduced over one rank only would miss this by the ranks' difference.
    for prev, row in zip(rows, rows[1:]):
        assert row["eaft/weight"] == pytest.approx(row["eaft/entropy"] / prev["eaft/entropy"], rel=1e-5)


@pytest.mark.e2e
def test_v1_trainer_is_refused(smollm2_dir, data_dir, tmp_path):
    cfg = train_config(smollm2_dir, data_dir, tmp_path / "v1", steps=1)
    env = dict(cli_env(), USE_V1="1")
    proc = run_train(write_yaml(cfg, tmp_path / "v1.yaml"), env=env, check=False, capture_output=True, timeout=600)
    assert proc.returncode != 0
    assert "the v1 trainer (USE_V1=1) ignores use_eaft_loss" in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_topk_larger_than_the_vocabulary_stops_before_training(smollm2_dir, data_dir, tmp_path):
    cfg = train_config(smollm2_dir, data_dir, tmp_path / "big", steps=1, eaft_topk=60000)
    proc = run_train(write_yaml(cfg, tmp_path / "big.yaml"), check=False, capture_output=True, timeout=600)
    assert proc.returncode != 0
    assert "LLaMA-Factory key `eaft_topk`: topk=60000 is larger than the vocabulary (49152)" in proc.stderr
    assert not (tmp_path / "big" / "trainer_state.json").exists()


@pytest.mark.e2e
def test_fused_run_matches_the_dense_run(smollm2_dir, data_dir, tmp_path, reference, eaft_run):
    """eaft_fused: true computes the loss from hidden states (no logits) and logs the same metrics."""
    rows = train(smollm2_dir, data_dir, tmp_path / "fused", eaft_fused=True).steps
    assert rows[0]["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    assert rows[0]["eaft/ce"] == pytest.approx(reference["ce"], rel=1e-4)
    assert rows[0]["eaft/tokens"] == reference["tokens"]
    for dense, fused in zip(eaft_run, rows):  # same updates, so later steps agree too
        assert fused["loss"] == pytest.approx(dense["loss"], rel=2e-3)
        assert fused["eaft/weight"] == pytest.approx(dense["eaft/weight"], rel=2e-3)


@pytest.mark.e2e
def test_fused_on_an_unsupported_family_stops_before_training(smollm2_dir, data_dir, tmp_path):
    """A Mamba model (its forward computes its own cross-entropy) with eaft_fused: a clear error, no dense fall-back."""
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(vocab_size=49152, hidden_size=32, state_size=4, num_hidden_layers=1, expand=2)
    mamba = save_with_tokenizer(MambaForCausalLM(config), smollm2_dir, tmp_path / "mamba")
    cfg = train_config(mamba, data_dir, tmp_path / "out", steps=1, cutoff_len=64, eaft_fused=True)
    proc = run_train(write_yaml(cfg, tmp_path / "mamba.yaml"), check=False, capture_output=True, timeout=600)
    assert proc.returncode != 0
    assert ("`eaft_fused: true`: fused EAFT cannot reproduce MambaForCausalLM's forward: its loss is not only "
            "the causal LM loss (self.loss_function)") in proc.stderr
    assert "or set `eaft_fused: false`" in proc.stderr
    assert not (tmp_path / "out" / "trainer_state.json").exists()


# ---- one real run per baseline method (a tiny random model: SmolLM2's weights are not the point), 2 steps of 4 rows.
# TALR runs fused (its loss from the hidden states, no logits): step 1 must still equal the dense op.

METHOD_RUNS = {
    "sft_kl": ({"use_sft_kl_loss": True, "sft_kl_beta": 0.3, "sft_kl_direction": "reverse"},
               {"beta": 0.3, "direction": "reverse"}),
    "flow": ({"use_flow_loss": True}, {}),
    "talr": ({"use_talr_loss": True, "talr_min_weight": 0.05, "talr_fused": True}, {"min_weight": 0.05}),
}


def method_config(model_dir, data_dir, out, method):
    return train_config(model_dir, data_dir, out, steps=2, cutoff_len=128, eaft=False, **METHOD_RUNS[method][0])


@pytest.fixture(scope="module")
def tiny_dir(smollm2_dir, tmp_path_factory):
    return tiny_llama(smollm2_dir, tmp_path_factory.mktemp("lf_tiny") / "model", head_std=4.0)


@pytest.fixture(scope="module")
def method_reference(tiny_dir, data_dir, tmp_path_factory):
    cfg = method_config(tiny_dir, data_dir, tmp_path_factory.mktemp("lf_method_ref") / "unused", "flow")
    return method_first_batch(cfg, 4, {m: options for m, (_, options) in METHOD_RUNS.items()})


@pytest.fixture(scope="module", params=list(METHOD_RUNS))
def method_run(request, tiny_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lf_method") / request.param
    return request.param, lf_train(method_config(tiny_dir, data_dir, out, request.param))


@pytest.mark.e2e
def test_each_method_trains_and_its_step_one_loss_is_the_op(method_run, method_reference):
    method, run = method_run
    check_method_steps(run.steps, method_reference[method], method, rel=1e-4)
    if method == "sft_kl":
        assert "the starting model is a frozen copy of the starting weights" in run.output
    if method == "flow":
        assert "starting losses of 24 training examples measured before step 1" in run.output
        assert (run.out_dir / "flow_weights.json").exists()


LF094 = ROOT / ".venv-lf094" / "bin" / "python"


def model_for_transformers4(model_dir, dest):
    """The SmolLM2 copy for transformers 4.57 (LLaMA-Factory 0.9.4's pin): the same weights, with the
    two settings transformers 5 writes in a form 4.57 does not read: the tokenizer class
    (`TokenizersBackend`) and rope_theta (inside `rope_parameters`; 4.57 would use 10000)."""
    dest.mkdir()
    for f in model_dir.iterdir():
        if f.name not in ("tokenizer_config.json", "config.json"):
            (dest / f.name).symlink_to(f)
    tok = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dest / "tokenizer_config.json").write_text(json.dumps(tok))
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta"))
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.e2e
def test_llamafactory_094_gains_the_flag(smollm2_dir, data_dir, tmp_path):
    """0.9.4 has no use_eaft_loss at all: the plugin adds it and runs our loss."""
    if not LF094.exists():
        pytest.skip("SKIPPED: needs .venv-lf094 (llamafactory 0.9.4): run scripts/setup.sh lf094")
    version = subprocess.run([str(LF094), "-c", "import importlib.metadata as m; print(m.version('llamafactory'))"],
                             capture_output=True, text=True).stdout.strip()
    assert version == "0.9.4"
    model_dir = model_for_transformers4(smollm2_dir, tmp_path / "smollm2_tf4")
    rows = train(model_dir, data_dir, tmp_path / "v094", python=str(LF094), eaft_topk=10).steps
    assert all("eaft/weight" in row for row in rows)
    ref = reference_of(model_dir, data_dir, tmp_path, {"topk": 10}, python=str(LF094))
    assert rows[0]["eaft/ce"] == pytest.approx(ref["ce"], rel=1e-4)
    assert rows[0]["loss"] == pytest.approx(ref["loss"], abs=6e-5)  # transformers 4.57 rounds `loss` to 4 places
