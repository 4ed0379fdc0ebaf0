"""The ms-swift integration without training: registration, the --eaft_* flags, the loss object.

Uses the installed ms-swift (real parser, real argument and loss classes); skips loudly without it.
"""

import os
import subprocess
import sys

import pytest
import torch

swift_loss = pytest.importorskip("swift.loss", reason="SKIPPED: ms-swift is not installed; nothing to integrate with")

from eaft_plugins import eaft_loss
from eaft_plugins.activation import status
from eaft_plugins.integrations.swift.args import SPELLING
from eaft_plugins.integrations.swift.loss import EAFTLoss
from eaft_plugins.options import EAFTConfig, EAFTOptions, FLOWOptions, SFTKLOptions, TALROptions, config_from_keys

IGNORE = -100


def parse(argv):
    """swift's own CLI parsing (HfArgumentParser over SftArguments), as `swift sft` does it."""
    from swift.arguments import SftArguments
    from swift.utils import parse_args

    return parse_args(SftArguments, ["--model", "m", "--dataset", "d.jsonl", *argv])


@pytest.fixture(scope="module")
def training_args(tmp_path_factory):
    from swift.trainers import Seq2SeqTrainingArguments

    return Seq2SeqTrainingArguments(output_dir=str(tmp_path_factory.mktemp("args")), loss_type="eaft", report_to=[])


def outputs(logits):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(logits=logits)


def batch(b=2, t=12, v=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :4] = IGNORE  # the prompt
    labels[1, 9:] = IGNORE  # right padding
    return logits, labels


def attach(training_args, config):
    """What `swift sft` does after parsing: the validated config on the trainer's arguments."""
    training_args.eaft_config = config


def options_from_flags(flags):
    return config_from_keys(flags, SPELLING).options


def swift_loss_scale(loss_scale):
    """What Seq2SeqTrainer.compute_loss hands a loss_type: loss_scale rolled by one and flattened."""
    return torch.roll(loss_scale, shifts=-1, dims=-1).view(-1)


@pytest.mark.e2e
def test_installing_is_enough_in_a_fresh_interpreter():
    """No import of eaft_plugins, no --external_plugins: the .pth bootstrap does the registration."""
    code = (
        "import dataclasses\n"
        "from swift.loss import loss_map\n"
        "from swift.arguments import SftArguments, PretrainArguments\n"
        "names = {f.name for f in dataclasses.fields(PretrainArguments)}\n"
        "print(loss_map['eaft'].__module__, 'eaft_weight_norm' in names)\n"
    )
    env = dict(os.environ)
    env.pop("EAFT_PLUGINS_DISABLE", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["eaft_plugins.integrations.swift.loss", "True"]


def test_registered_in_this_process():
    from swift.arguments import SftArguments  # noqa: F401  (the flags are added when this is imported)
    from swift.loss import loss_map

    assert loss_map["eaft"] is EAFTLoss
    patched = " ".join(status("swift").patched)
    assert "loss_map['eaft']" in patched and "--eaft_topk" in patched


@pytest.mark.parametrize(
    "flag, value, allowed",
    [
        ("--eaft_gate", "sharp", "['soft', 'hard', 'shuffle']"),
        ("--eaft_entropy_norm", "log2", "['ln_k', 'upstream', 'none']"),
        ("--eaft_weight_norm", "sum", "['none', 'mean']"),
        ("--eaft_topk", "1", "integer >= 2 or 'full'"),
        ("--eaft_alpha", "-1", ">= 0.0"),
        ("--eaft_p_min", "2", "in [0.0, 1.0]"),
        ("--eaft_h_min", "-0.5", ">= 0.0"),
    ],
)
def test_bad_values_name_the_flag(flag, value, allowed):
    with pytest.raises(ValueError) as err:
        parse(["--loss_type", "eaft", flag, value])
    assert str(err.value).startswith(f"{flag} ") and " is invalid: " in str(err.value)
    assert allowed in str(err.value)


def test_flags_need_loss_type_eaft():
    with pytest.raises(ValueError, match=r"--eaft_topk set but --loss_type is None.*--loss_type eaft"):
        parse(["--eaft_topk", "20"])  # even the default value: never silently off
    with pytest.raises(ValueError, match=r"--eaft_gate, --eaft_log_metrics set but --loss_type is 'cross_entropy'"):
        parse(["--loss_type", "cross_entropy", "--eaft_gate", "hard", "--eaft_log_metrics", "false"])


def test_rlhf_with_eaft_flags_is_refused_without_suggesting_loss_type():
    from swift.arguments import RLHFArguments
    from swift.utils import parse_args

    with pytest.raises(ValueError) as err:
        parse_args(RLHFArguments, ["--model", "m", "--dataset", "d.jsonl", "--rlhf_type", "dpo", "--eaft_topk", "20"])
    message = str(err.value)
    assert "--eaft_topk: EAFT is for `swift sft` / `swift pt`, not rlhf (--rlhf_type dpo)" in message
    assert "Add --loss_type" not in message


# ---- --loss_type sft_kl / flow / talr: the math table's other losses


def test_every_method_is_a_loss_type():
    from swift.arguments import SftArguments  # noqa: F401
    from swift.loss import loss_map

    assert all(loss_map[m] is EAFTLoss for m in ("eaft", "sft_kl", "flow", "talr"))


@pytest.mark.parametrize("flags, options, fused", [
    ({"loss_type": "sft_kl", "sft_kl_beta": "0.2", "sft_kl_direction": "reverse"},
     SFTKLOptions(beta=0.2, direction="reverse"), False),
    ({"loss_type": "flow", "flow_tau": "0.5", "flow_fused": "true"}, FLOWOptions(tau=0.5), True),
    ({"loss_type": "talr", "talr_tau": "median", "talr_min_weight": "0"}, TALROptions(min_weight=0.0), False),
    ({"loss_type": "talr"}, TALROptions(), False),
])
def test_method_flags_become_options(flags, options, fused):
    """What SftArguments.__post_init__ checks (a full parse of valid flags would go on to load the model)."""
    from types import SimpleNamespace

    from eaft_plugins.integrations.swift.args import check_arguments

    config = check_arguments(SimpleNamespace(**flags))
    assert config.method == flags["loss_type"] and config.options == options and config.fused is fused


@pytest.mark.parametrize("argv, message", [
    (["--loss_type", "flow", "--flow_tau", "hot"], r"^--flow_tau 'hot' is invalid: tau must be a positive number or "
                                                   r"'median'"),
    (["--loss_type", "talr", "--talr_min_weight", "1.5"], r"^--talr_min_weight 1.5 is invalid: min_weight must be in "
                                                          r"\[0.0, 1.0\]"),
    (["--loss_type", "sft_kl", "--sft_kl_direction", "up"], r"^--sft_kl_direction 'up' is invalid: direction must be "
                                                            r"one of \['forward', 'reverse'\]"),
    (["--loss_type", "sft_kl", "--sft_kl_fused", "true"], r"^--sft_kl_fused True is invalid: SFT-KL has no fused "
                                                          r"path .*set --sft_kl_fused false"),
    (["--flow_tau", "1"], r"--flow_tau set but --loss_type is None: FLOW settings only apply with --loss_type flow"),
    (["--loss_type", "talr", "--sft_kl_beta", "0.5"], r"--sft_kl_beta set but --loss_type is 'talr': SFT-KL settings "
                                                      r"only apply with --loss_type sft_kl"),
    (["--loss_type", "flow", "--eaft_topk", "20"], r"--eaft_topk set but --loss_type is 'flow'"),
    (["--loss_type", "talr", "--enable_dft_loss", "true"], r"--loss_type talr and --enable_dft_loss both replace the "
                                                           r"loss"),
    (["--loss_type", "sft_kl", "--sequence_parallel_size", "2"], r"--loss_type sft_kl does not support "
                                                                 r"--sequence_parallel_size 2: the SFT-KL loss"),
    (["--loss_type", "flow", "--label_smoothing_factor", "0.1"], r"FLOW replaces the loss.*--label_smoothing_factor 0"),
    (["--loss_type", "flow", "--packing", "true"], r"--loss_type flow with --packing: FLOW weighs each training "
                                                   r"example.*set --packing false"),
    (["--loss_type", "flow", "--padding_free", "true"], r"--loss_type flow with --padding_free"),
    (["--loss_type", "sft_kl", "--use_liger_kernel", "true"], r"--loss_type sft_kl with --use_liger_kernel: the dense "
                                                              r"SFT-KL loss needs the full logits.* Set "
                                                              r"--use_liger_kernel false$"),
    (["--loss_type", "talr", "--use_liger_kernel", "true"], r"Set --talr_fused true \(fused TALR"),
])
def test_method_settings_are_refused_naming_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(argv)


def test_rlhf_with_method_flags_is_refused():
    from swift.arguments import RLHFArguments
    from swift.utils import parse_args

    with pytest.raises(ValueError, match=r"--talr_tau: TALR is for `swift sft` / `swift pt`, not rlhf"):
        parse_args(RLHFArguments, ["--model", "m", "--dataset", "d.jsonl", "--rlhf_type", "dpo", "--talr_tau", "1"])


@pytest.mark.parametrize("loss_type", ["sft_kl", "flow", "talr"])
def test_megatron_refuses_the_other_methods(loss_type):
    from types import SimpleNamespace

    from eaft_plugins.integrations.swift import megatron

    with pytest.raises(ValueError, match=rf"--loss_type {loss_type} is not wired into `megatron sft`.*run {loss_type} "
                                         r"with `swift sft`"):
        megatron.configure(SimpleNamespace(loss_type=loss_type))


def test_quoted_booleans_are_parsed():
    config = config_from_keys({"eaft_fused": "false", "eaft_log_metrics": "FALSE"}, SPELLING)
    assert config.fused is False and config.log_metrics is False
    assert config_from_keys({"eaft_fused": "1"}, SPELLING).fused is True
    with pytest.raises(ValueError, match=r"^--eaft_fused 'off' is invalid: must be true or false"):
        config_from_keys({"eaft_fused": "off"}, SPELLING)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--enable_dft_loss", "true"], "--enable_dft_loss"),
        (["--sequence_parallel_size", "2"], "does not support --sequence_parallel_size 2"),
        (["--label_smoothing_factor", "0.1"], "--label_smoothing_factor 0"),
    ],
)
def test_refused_combinations(extra, message):
    with pytest.raises(ValueError, match=message):
        parse(["--loss_type", "eaft", *extra])


def test_the_eaft_forks_flag_means_loss_type_eaft_with_its_normalisation(smollm2_dir, tmp_path):
    """`--enable_eaft_loss true --eaft_alpha A`, as the paper's own ms-swift fork spells it: top-20 entropy / 3.0."""
    args, _ = parse_real(smollm2_dir, tmp_path, ["--enable_eaft_loss", "true", "--eaft_alpha", "0.5"])
    assert args.loss_type == "eaft" and args.training_args.loss_type == "eaft"
    assert args.training_args.eaft_config.options == EAFTOptions(topk=20, alpha=0.5, entropy_norm="upstream")
    args, _ = parse_real(smollm2_dir, tmp_path, ["--enable_eaft_loss", "TRUE", "--eaft_entropy_norm", "ln_k"])
    assert args.eaft_config.options.entropy_norm == "ln_k"  # an explicit choice is kept
    args, _ = parse_real(smollm2_dir, tmp_path, ["--enable_eaft_loss", "true", "--loss_type", "eaft"])
    assert args.eaft_config.options.entropy_norm == "upstream"
    with pytest.raises(ValueError, match=r"--enable_eaft_loss true .* with --loss_type cross_entropy: both choose"):
        parse(["--enable_eaft_loss", "true", "--loss_type", "cross_entropy"])
    with pytest.raises(ValueError, match=r"--eaft_alpha set but --loss_type is None"):
        parse(["--enable_eaft_loss", "false", "--eaft_alpha", "0.5"])
    with pytest.raises(ValueError, match=r"--enable_eaft_loss 'perhaps' is invalid"):
        parse(["--enable_eaft_loss", "perhaps"])


def test_an_ms_swift_with_its_own_eaft_flag_runs_its_own_never_both(capsys):
    import dataclasses

    from eaft_plugins.integrations.swift.args import check_arguments, extend_sft_arguments

    @dataclasses.dataclass
    class FutureArgs:  # an ms-swift release that defines --enable_eaft_loss itself
        loss_type: str = None
        enable_eaft_loss: bool = False

        def __post_init__(self):
            pass

    extend_sft_arguments(FutureArgs, check=check_arguments)
    assert dataclasses.fields(FutureArgs)[1].default is False  # upstream's field kept as it is
    own = FutureArgs(enable_eaft_loss=True)
    assert own.loss_type is None and own.eaft_config is None  # ms-swift's own EAFT: eaft-plugins stays out
    assert "ms-swift's own EAFT runs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="EAFT would be applied twice"):
        FutureArgs(enable_eaft_loss=True, loss_type="eaft")


def test_flag_values_become_options():
    opts = options_from_flags({"eaft_topk": "full", "eaft_alpha": 0.5, "eaft_gate": "hard", "eaft_weight_norm": "mean"})
    assert opts == EAFTOptions(topk=None, alpha=0.5, gate="hard", weight_norm="mean")
    assert options_from_flags({"eaft_topk": "7"}).topk == 7
    assert options_from_flags({}) == EAFTOptions()


def test_loss_matches_core_with_flags(training_args):
    logits, labels = batch()
    attach(training_args, EAFTConfig(EAFTOptions(topk=5, alpha=0.7)))
    loss = EAFTLoss(training_args, None)
    got = loss(outputs(logits), labels, num_items_in_batch=torch.tensor(11))
    want = eaft_loss(logits, labels, topk=5, alpha=0.7, num_items_in_batch=11).loss
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert loss.options.topk == 5 and loss.log_metrics is True


def test_loss_scale_aligned_like_swifts_cross_entropy(training_args):
    """gate=hard with h_min=0 makes every weight 1, so EAFT must equal swift's own loss exactly."""
    from swift.loss import loss_map

    logits, labels = batch(seed=3)
    scale = torch.ones(labels.shape)
    scale[0, 6:9] = 2.5
    scale[1, 5] = 0.0
    attach(training_args, EAFTConfig(EAFTOptions(gate="hard", h_min=0.0)))
    ours = EAFTLoss(training_args, None)(outputs(logits), labels, loss_scale=swift_loss_scale(scale))
    theirs = loss_map["cross_entropy"](training_args, None)(outputs(logits), labels, loss_scale=swift_loss_scale(scale))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    plain = loss_map["cross_entropy"](training_args, None)(outputs(logits), labels)
    assert ours.item() != pytest.approx(plain.item(), rel=1e-3)
    # and with soft weights: the core with the unshifted scale as token_scale
    attach(training_args, EAFTConfig(EAFTOptions()))
    soft = EAFTLoss(training_args, None)(outputs(logits), labels, loss_scale=swift_loss_scale(scale))
    assert soft.item() == pytest.approx(eaft_loss(logits, labels, token_scale=scale).loss.item(), rel=1e-6)


def test_padding_free_packed_row_equals_separate_rows(training_args):
    """Padding-free: swift packs rows into [1, T]; each row's first label is -100, so no cross-row scoring."""
    logits, labels = batch(b=2, t=10, seed=5)
    labels[:, 0] = IGNORE
    attach(training_args, EAFTConfig(EAFTOptions()))
    packed = EAFTLoss(training_args, None)(outputs(logits.reshape(1, 20, -1)), labels.reshape(1, 20))
    n = int((labels[:, 1:] != IGNORE).sum())
    rows = sum(eaft_loss(logits[i : i + 1], labels[i : i + 1], num_items_in_batch=n).loss for i in range(2))
    assert packed.item() == pytest.approx(rows.item(), rel=1e-6)


def test_backward_gives_finite_grads(training_args):
    logits, labels = batch(seed=7)
    logits.requires_grad_()
    attach(training_args, EAFTConfig(EAFTOptions()))
    EAFTLoss(training_args, None)(outputs(logits), labels).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_missing_logits_is_an_error(training_args):
    attach(training_args, EAFTConfig(EAFTOptions()))
    with pytest.raises(ValueError, match="needs the model's logits"):
        EAFTLoss(training_args, None)(outputs(None), torch.zeros(1, 4, dtype=torch.long))


# --eaft_fused: flags, and the fused compute_loss on a real Seq2SeqTrainer (SmolLM2, CPU, in this process).


def parse_real(smollm2_dir, tmp_path, argv):
    """Full parsing on the real model (builds training_args), as `swift sft` does before loading weights."""
    return parse(["--model", str(smollm2_dir), "--model_type", "llama", "--template", "chatml",
                  "--output_dir", str(tmp_path), "--add_version", "false", "--report_to", "none", *argv])


def test_fused_flag_reaches_the_trainer_args_not_the_options(smollm2_dir, tmp_path):
    from eaft_plugins.options import SETTINGS_BY_KEY

    assert SETTINGS_BY_KEY["eaft_fused"].trainer
    args, _ = parse_real(smollm2_dir, tmp_path, ["--loss_type", "eaft", "--eaft_fused", "true", "--eaft_topk", "7"])
    assert args.training_args.eaft_config.fused is True
    assert args.training_args.eaft_config.options == EAFTOptions(topk=7)
    args, _ = parse_real(smollm2_dir, tmp_path, ["--loss_type", "eaft"])
    assert args.training_args.eaft_config.fused is False
    assert options_from_flags({"eaft_fused": True}) == EAFTOptions()


def test_fused_flag_needs_loss_type_eaft():
    with pytest.raises(ValueError, match=r"--eaft_fused set but --loss_type is None.*--loss_type eaft"):
        parse(["--eaft_fused", "true"])
    with pytest.raises(ValueError, match=r"--eaft_fused set but --loss_type is 'cross_entropy'"):
        parse(["--loss_type", "cross_entropy", "--eaft_fused", "false"])


def test_liger_without_fused_is_refused_naming_both_ways_out():
    with pytest.raises(ValueError) as err:
        parse(["--loss_type", "eaft", "--use_liger_kernel", "true"])
    assert "--use_liger_kernel" in str(err.value)
    assert "Set --eaft_fused true" in str(err.value) and "or --use_liger_kernel false" in str(err.value)


def test_liger_with_fused_passes_the_eaft_checks(smollm2_dir, tmp_path):
    """Allowed: the fused forward replaces Liger's. Without liger-kernel installed ms-swift itself then stops."""
    try:
        args, _ = parse_real(smollm2_dir, tmp_path, ["--loss_type", "eaft", "--eaft_fused", "true", "--use_liger_kernel", "true"])
    except AssertionError as exc:  # ms-swift's own check: liger-kernel is not installed here
        assert "liger" in str(exc)
    else:
        assert args.training_args.eaft_fused is True


def test_fused_refuses_channel_loss():
    with pytest.raises(ValueError, match="--eaft_fused true with --enable_channel_loss"):
        parse(["--loss_type", "eaft", "--eaft_fused", "true", "--enable_channel_loss", "true"])


@pytest.fixture(scope="module")
def swift_model(smollm2_dir):
    """SmolLM2 loaded by ms-swift itself (model_meta / model_info set), its chatml template, 4 encoded rows."""
    from swift.model import get_model_processor
    from swift.template import get_template

    from eaft_plugins.tools import mathgen

    model, processor = get_model_processor(str(smollm2_dir), model_type="llama", torch_dtype=torch.float32)
    template = get_template(processor, template_type="chatml", max_length=256, is_binary_loss_scale=False)
    template.set_mode("train")
    encoded = []
    for item, scale in zip(mathgen.generate(4, seed=1), (2.0, 0.5, 1.0, 1.0)):
        messages = [{"role": "user", "content": item["question"]},
                    {"role": "assistant", "content": item["answer"], "loss_scale": scale}]
        encoded.append(template.encode({"messages": messages}))
    return model, template, encoded


def swift_trainer(model, template, encoded, out, fused, **option_kwargs):
    """A real ms-swift Seq2SeqTrainer with --loss_type eaft (the loss built from loss_map, as `swift sft` does)."""
    from swift.trainers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    args = Seq2SeqTrainingArguments(output_dir=str(out), loss_type="eaft", report_to=[], check_model=False,
                                     per_device_train_batch_size=2, remove_unused_columns=False)
    attach(args, EAFTConfig(EAFTOptions(**option_kwargs), fused=bool(fused)))
    return Seq2SeqTrainer(model=model, args=args, template=template, train_dataset=encoded)


def micro_batch_losses(trainer, batches, steps, n):
    """compute_loss per micro-batch in train mode (global_step as given), no backward: the fused op
    computes gradients inside the forward only when they are wanted."""
    trainer.model.train()
    losses = []
    with torch.no_grad():
        for batch, step in zip(batches, steps):
            trainer.state.global_step = step
            inputs = trainer._prepare_inputs(dict(batch))
            losses.append(trainer.compute_loss(trainer.model, inputs, num_items_in_batch=torch.tensor(n)).item())
    return losses


def metric_values(trainer, mode="train"):
    return {k: m.compute() for k, m in trainer.custom_metrics[mode].items()}


@pytest.mark.e2e
def test_fused_trainer_equals_dense_trainer(swift_model, tmp_path):
    """Same batches through ms-swift's own compute_loss + EAFTLoss (dense) and the fused compute_loss:
    equal losses (loss_scale and weight_norm="mean" across two optimizer steps included), equal
    eaft/* metrics, equal eval loss; no logits, so no token_acc, on the fused side."""
    import copy

    model, template, encoded = swift_model
    dense_model = copy.deepcopy(model)
    fused = swift_trainer(model, template, encoded, tmp_path / "fused", True, topk=10, alpha=0.5, weight_norm="mean")
    dense = swift_trainer(dense_model, template, encoded, tmp_path / "dense", False, topk=10, alpha=0.5,
                          weight_norm="mean")
    handle = fused.compute_loss_func.fused
    assert handle is not None and model.eaft_fused is handle and "forward" in model.__dict__  # bound at __init__
    assert dense.compute_loss_func.fused is None and "forward" not in dense_model.__dict__
    batches = [template.data_collator(encoded[i:i + 2]) for i in (0, 2, 0)]
    n = sum(int((torch.tensor(e["labels"][1:]) != IGNORE).sum()) for e in encoded)
    steps = [0, 0, 1]  # step 0: two micro-batches; step 1 divides by step 0's mean raw weight
    want = micro_batch_losses(dense, batches, steps, n)
    got = micro_batch_losses(fused, batches, steps, n)
    assert got == pytest.approx(want, rel=1e-5)
    assert fused.compute_loss_func.mean_weight == pytest.approx(dense.compute_loss_func.mean_weight, rel=1e-9)
    assert fused.compute_loss_func.mean_weight is not None
    want_metrics, got_metrics = metric_values(dense), metric_values(fused)
    assert "token_acc" in want_metrics and "token_acc" not in got_metrics
    for key in ("eaft/ce", "eaft/weight", "eaft/entropy", "eaft/conflict_frac"):
        assert got_metrics[key] == pytest.approx(want_metrics[key], rel=1e-6)
    # evaluation: Trainer.prediction_step under no_grad; the patched forward gets the labels too
    for trainer in (fused, dense):
        trainer.model.eval()
    got_eval = fused.prediction_step(fused.model, dict(batches[0]), prediction_loss_only=True)[0]
    want_eval = dense.prediction_step(dense.model, dict(batches[0]), prediction_loss_only=True)[0]
    assert got_eval.item() == pytest.approx(want_eval.item(), rel=1e-5)
    assert metric_values(fused, "eval")["eaft/ce"] == pytest.approx(metric_values(dense, "eval")["eaft/ce"], rel=1e-6)
    handle.unpatch()


@pytest.mark.e2e
def test_fused_forward_wins_over_a_later_instance_forward(swift_model, tmp_path):
    """Trainer.train() applies Liger after __init__, replacing the instance's forward (liger-kernel's
    instance patch sets `model.forward`); the fused compute_loss re-patches, and stays fused."""
    import types

    model, template, encoded = swift_model
    trainer = swift_trainer(model, template, encoded, tmp_path, True)
    model.forward = types.MethodType(type(model).forward, model)  # what the later patch does
    batch = template.data_collator(encoded[:2])
    loss = micro_batch_losses(trainer, [batch], [0], 50)[0]
    handle = trainer.compute_loss_func.fused
    assert model.eaft_fused is handle and handle.last_stats is not None
    assert "token_acc" not in metric_values(trainer)  # no logits were built
    handle.unpatch()
    logits = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}).logits
    want = eaft_loss(logits, batch["labels"], token_scale=batch["loss_scale"], num_items_in_batch=50).loss
    assert loss == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.e2e
def test_fused_refuses_lora_on_lm_head_before_training(swift_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, template, encoded = swift_model
    import copy

    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match=r"--eaft_fused true: fused EAFT needs a plain nn.Linear lm_head"):
        swift_trainer(lora, template, encoded, tmp_path, True)


@pytest.mark.e2e
def test_fused_refuses_an_unsupported_model_family(swift_model, tmp_path):
    import transformers

    model, template, encoded = swift_model
    config = transformers.BartConfig(vocab_size=model.config.vocab_size, d_model=16, decoder_layers=1, encoder_layers=1,
                                     decoder_ffn_dim=16, encoder_ffn_dim=16, decoder_attention_heads=2,
                                     encoder_attention_heads=2)
    other = transformers.BartForCausalLM(config)  # denied: fused EAFT covers decoder-only families
    other.model_meta, other.model_info = model.model_meta, model.model_info  # what ms-swift's loader attaches
    with pytest.raises(ValueError) as err:
        swift_trainer(other, template, encoded, tmp_path, True)
    message = str(err.value)
    assert "--eaft_fused true: fused EAFT does not support BartForCausalLM: the decoder of an encoder-decoder" in message
    assert "set --eaft_fused false" in message and "eaft_fused to false" not in message  # swift's own spelling


@pytest.mark.e2e
def test_topk_larger_than_the_vocabulary_stops_when_the_trainer_is_built(swift_model, tmp_path):
    model, template, encoded = swift_model
    with pytest.raises(ValueError, match=r"^--eaft_topk: topk=1000000000 is larger than the vocabulary \(49152\)"):
        swift_trainer(model, template, encoded, tmp_path, False, topk=1000000000)


@pytest.mark.e2e
def test_all_masked_micro_batch_logs_no_means(swift_model, tmp_path):
    model, template, encoded = swift_model
    trainer = swift_trainer(model, template, encoded, tmp_path, False)
    batch = template.data_collator(encoded[:2])
    batch["labels"][:] = IGNORE
    loss = micro_batch_losses(trainer, [batch], [0], 1)[0]
    assert loss == 0.0
    assert all(v is None for v in metric_values(trainer).values())  # nothing logged over 0 tokens


@pytest.mark.e2e
def test_doctor_says_whether_swift_sft_can_run_here():
    """ms-swift imports in .venv (datasets 4.0) but `swift sft` would die on datasets.features.Json: doctor says so."""
    proc = subprocess.run([sys.executable, "-m", "eaft_plugins", "doctor"], capture_output=True, text=True, timeout=300)
    try:
        from datasets.features import Json  # noqa: F401

        runnable = True
    except ImportError:
        runnable = False
    said = "CANNOT RUN: `swift sft` cannot run here" in proc.stdout
    assert said is (not runnable), proc.stdout[-2000:]
    if said:
        assert proc.returncode == 1 and ".venv-swift" in proc.stdout
