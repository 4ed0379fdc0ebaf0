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
from eaft_plugins.integrations.swift_args import attach, options_from_flags
from eaft_plugins.integrations.swift_loss import EAFTLoss
from eaft_plugins.options import EAFTOptions

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


def swift_loss_scale(loss_scale):
    """What Seq2SeqTrainer.compute_loss hands a loss_type: loss_scale rolled by one and flattened."""
    return torch.roll(loss_scale, shifts=-1, dims=-1).view(-1)


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
    assert proc.stdout.split()[-2:] == ["eaft_plugins.integrations.swift_loss", "True"]


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


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--enable_dft_loss", "true"], "--enable_dft_loss"),
        (["--sequence_parallel_size", "2"], "does not support sequence parallel"),
        (["--label_smoothing_factor", "0.1"], "--label_smoothing_factor 0"),
    ],
)
def test_refused_combinations(extra, message):
    with pytest.raises(ValueError, match=message):
        parse(["--loss_type", "eaft", *extra])


def test_flag_values_become_options():
    opts = options_from_flags({"eaft_topk": "full", "eaft_alpha": 0.5, "eaft_gate": "hard", "eaft_weight_norm": "mean"})
    assert opts == EAFTOptions(topk=None, alpha=0.5, gate="hard", weight_norm="mean")
    assert options_from_flags({"eaft_topk": "7"}).topk == 7
    assert options_from_flags({}) == EAFTOptions()


def test_loss_matches_core_with_flags(training_args):
    logits, labels = batch()
    attach(training_args, EAFTOptions(topk=5, alpha=0.7), None)
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
    attach(training_args, EAFTOptions(gate="hard", h_min=0.0), None)
    ours = EAFTLoss(training_args, None)(outputs(logits), labels, loss_scale=swift_loss_scale(scale))
    theirs = loss_map["cross_entropy"](training_args, None)(outputs(logits), labels, loss_scale=swift_loss_scale(scale))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    plain = loss_map["cross_entropy"](training_args, None)(outputs(logits), labels)
    assert ours.item() != pytest.approx(plain.item(), rel=1e-3)
    # and with soft weights: the core with the unshifted scale as token_scale
    attach(training_args, EAFTOptions(), None)
    soft = EAFTLoss(training_args, None)(outputs(logits), labels, loss_scale=swift_loss_scale(scale))
    assert soft.item() == pytest.approx(eaft_loss(logits, labels, token_scale=scale).loss.item(), rel=1e-6)


def test_padding_free_packed_row_equals_separate_rows(training_args):
    """Padding-free: swift packs rows into [1, T]; each row's first label is -100, so no cross-row scoring."""
    logits, labels = batch(b=2, t=10, seed=5)
    labels[:, 0] = IGNORE
    attach(training_args, EAFTOptions(), None)
    packed = EAFTLoss(training_args, None)(outputs(logits.reshape(1, 20, -1)), labels.reshape(1, 20))
    n = int((labels[:, 1:] != IGNORE).sum())
    rows = sum(eaft_loss(logits[i : i + 1], labels[i : i + 1], num_items_in_batch=n).loss for i in range(2))
    assert packed.item() == pytest.approx(rows.item(), rel=1e-6)


def test_backward_gives_finite_grads(training_args):
    logits, labels = batch(seed=7)
    logits.requires_grad_()
    attach(training_args, EAFTOptions(), None)
    EAFTLoss(training_args, None)(outputs(logits), labels).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_missing_logits_is_an_error(training_args):
    attach(training_args, EAFTOptions(), None)
    with pytest.raises(ValueError, match="needs the model's logits"):
        EAFTLoss(training_args, None)(outputs(None), torch.zeros(1, 4, dtype=torch.long))
