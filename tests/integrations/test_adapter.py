"""The layer every framework adapter shares: the refusal table in each framework's words, the fields added to
its argument dataclass (help texts that argparse can print), one wrapper per method, one route to the config."""

import argparse
import dataclasses
import types
from typing import Optional

import pytest

from eaft_plugins.integrations import adapter
from eaft_plugins.options import KEYS, USER_SETTINGS, EAFTConfig, Spelling

SWIFT = Spelling("--{key}", "--{key} {value}", "--loss_type eaft")
LF = Spelling("LLaMA-Factory key `{key}`", "`{key}: {value}`", "`use_eaft_loss: true`")
TRL = Spelling("SFTConfig field `{key}` (--{key})", "{key}={value}", 'loss_type="eaft"', python_values=True)


@pytest.mark.parametrize("concept, key, value, fused", [
    ("liger", "use_liger_kernel", True, False), ("label_smoothing", "label_smoothing_factor", 0.1, False),
    ("parallel", "sequence_parallel_size", 2, False), ("replicas", "n_gpu", 2, True),
    ("channel_loss", "enable_channel_loss", True, True), ("other_loss", "enable_dft_loss", True, False),
])
def test_each_refusal_names_the_key_and_the_fix_in_the_frameworks_words(concept, key, value, fused):
    (message,) = adapter.refusals(SWIFT, [(concept, key, value)], fused)
    assert f"--{key}" in message
    lifted = adapter.REFUSALS[concept][2]
    if concept != "replicas":
        assert SWIFT.assign(key, lifted) in message  # e.g. --use_liger_kernel false
    (lf,) = adapter.refusals(LF, [(concept, key, value)], fused)
    assert f"LLaMA-Factory key `{key}`" in lf


@pytest.mark.parametrize("concept, value, fused", [
    ("liger", True, True),  # the fused forward replaces Liger's: allowed
    ("liger", False, False), ("label_smoothing", 0, False), ("label_smoothing", None, False), ("parallel", 1, False),
    ("replicas", 1, False), ("channel_loss", True, False),  # channel loss only needs the logits the dense path has
    ("other_loss", False, False),
])
def test_allowed_combinations_pass(concept, value, fused):
    assert adapter.refusals(SWIFT, [(concept, "k", value)], fused) == []


def test_refuse_raises_one_problem_as_is_and_several_as_a_list():
    with pytest.raises(ValueError, match=r"^--loss_type eaft with --use_liger_kernel: .*Set --eaft_fused true"):
        adapter.refuse(SWIFT, [("liger", "use_liger_kernel", True)], fused=False)
    with pytest.raises(ValueError) as err:
        adapter.refuse(TRL, [("liger", "use_liger_kernel", True), ("label_smoothing", "label_smoothing_factor", 0.1)],
                       fused=False, extra=["stage: pt ignores the loss"])
    lines = str(err.value).splitlines()
    assert lines[0] == 'loss_type="eaft" cannot run as configured:' and len(lines) == 4
    assert "eaft_fused=True" in lines[2] and "use_liger_kernel=False" in lines[2]
    adapter.refuse(SWIFT, [], fused=False)  # nothing refused: no error


def test_parallelism_config_observations():
    pc = types.SimpleNamespace(cp_enabled=True, cp_size=2, sp_enabled=False, sp_size=1, tp_enabled=True, tp_size=4)
    observed = adapter.parallelism_observed(pc, "parallelism_config")
    assert observed == [("parallel", "parallelism_config.cp_size", 2), ("parallel", "parallelism_config.tp_size", 4)]
    assert adapter.parallelism_observed(None, "x") == []


def test_keys_without_eaft_are_refused_even_at_their_default():
    adapter.refuse_keys_without_eaft([], SWIFT, "--loss_type is None")
    with pytest.raises(ValueError, match=r"^--eaft_topk, --eaft_alpha set but --loss_type is None: EAFT settings only "
                                         r"apply with --loss_type eaft; add it or drop them$"):
        adapter.refuse_keys_without_eaft(["eaft_topk", "eaft_alpha"], SWIFT, "--loss_type is None")
    args = types.SimpleNamespace(eaft_topk=20, eaft_alpha=None, retention_probe="builtin")
    assert adapter.given_keys(args) == {"eaft_topk": 20}  # retention keys are not EAFT settings


def test_the_run_comes_only_from_the_parsed_config():
    with pytest.raises(RuntimeError, match=r"^--loss_type eaft is set, but eaft-plugins did not parse"):
        adapter.run_for(types.SimpleNamespace(), SWIFT)
    run = adapter.run_for(types.SimpleNamespace(eaft_config=EAFTConfig(log_metrics=False)), SWIFT)
    assert run.log_metrics is False and run.spelling is SWIFT


def test_fields_are_added_once_with_help_argparse_can_print():
    @dataclasses.dataclass
    class Args:
        lr: float = 1e-5

    assert adapter.add_setting_fields(Args, SWIFT) is True
    assert adapter.add_setting_fields(Args, SWIFT) is False  # once

    @dataclasses.dataclass
    class Child(Args):
        x: int = 0

    assert adapter.add_setting_fields(Child, SWIFT) is False  # inherited
    fields = {f.name: f for f in dataclasses.fields(Args)}
    assert {s.key for s in USER_SETTINGS} <= set(fields)
    assert all(fields[k].default is None for k in KEYS) and Args().eaft_topk is None
    parser = argparse.ArgumentParser()
    for s in USER_SETTINGS:
        parser.add_argument(f"--{s.key}", help=fields[s.key].metadata["help"])
    text = parser.format_help()  # a bare % in a help text makes argparse raise here
    assert "more than 3% of the training time" in " ".join(text.split())


def test_a_release_defining_our_keys_is_refused_and_upstream_keys_are_kept():
    @dataclasses.dataclass
    class Future:
        eaft_alpha: float = 1.0
        eaft_topk: int = 20

    with pytest.raises(RuntimeError, match=r"^fw 9 defines \['eaft_topk'\] itself"):
        adapter.add_setting_fields(Future, SWIFT, upstream=("eaft_alpha",), framework="fw 9")

    @dataclasses.dataclass
    class Upstream:
        eaft_alpha: float = 1.0

    adapter.add_setting_fields(Upstream, SWIFT, upstream=("eaft_alpha",), extra={"flag": (Optional[bool], "h", False)})
    fields = {f.name: f for f in dataclasses.fields(Upstream)}
    assert fields["eaft_alpha"].default == 1.0 and fields["flag"].default is False and fields["eaft_topk"].default is None


def test_a_method_is_wrapped_once_and_a_subclass_gets_its_own_wrapper():
    class Base:
        def f(self):
            return ["base"]

    class Sub(Base):
        pass

    def make(original):
        def f(self):
            return original(self) + ["wrapped"]

        return f

    assert adapter.patch_method(Base, "f", make) is True
    assert adapter.patch_method(Base, "f", make) is False
    assert Base().f() == ["base", "wrapped"]
    assert adapter.patch_method(Sub, "f", make) is False  # inherits the wrapper: never twice
    assert Sub().f() == ["base", "wrapped"] and Base.f.__wrapped__ is not None

    class Own(Base):
        def f(self):
            return ["own"]

    assert adapter.patch_method(Own, "f", make) is True  # its own method gets its own wrapper
    assert Own().f() == ["own", "wrapped"]


# ---- the other methods: the same table, in their names


FLOW_SWIFT = SWIFT.__class__("--{key}", "--{key} {value}", "--loss_type eaft", method_format="--loss_type {method}")


@pytest.mark.parametrize("method, title", [("sft_kl", "SFT-KL"), ("flow", "FLOW"), ("talr", "TALR")])
def test_refusals_name_the_method_and_its_own_fused_key(method, title):
    spelling = FLOW_SWIFT.for_method(method)
    (smoothing,) = adapter.refusals(spelling, [("label_smoothing", "label_smoothing_factor", 0.1)], False)
    assert smoothing.startswith(f"--loss_type {method} with --label_smoothing_factor 0.1: {title} replaces the loss")
    (liger,) = adapter.refusals(spelling, [("liger", "use_liger_kernel", True)], False)
    assert f"the dense {title} loss needs the full logits" in liger
    if method == "sft_kl":  # no fused path to offer
        assert liger.endswith("Set --use_liger_kernel false") and "fused" not in liger.split("avoid")[1]
    else:
        assert f"Set --{method}_fused true (fused {title}" in liger
    (channel,) = adapter.refusals(spelling, [("channel_loss", "enable_channel_loss", True)], True)
    assert channel.startswith(f"--{method}_fused true with --enable_channel_loss") and f"--{method}_fused false" in channel


def test_packing_is_a_flow_refusal():
    (message,) = adapter.refusals(FLOW_SWIFT.for_method("flow"), [("packing", "packing", True)], False)
    assert message == ("--loss_type flow with --packing: FLOW weighs each training example by its own starting loss, "
                       "and a packed or padding-free row mixes examples; set --packing false")


def test_keys_of_a_method_that_is_off_are_refused():
    adapter.refuse_keys_of_other_methods(["flow_tau"], "flow", FLOW_SWIFT, "x")  # its own: fine
    with pytest.raises(ValueError, match=r"^--flow_tau set but --loss_type is 'talr': FLOW settings only apply with "
                                         r"--loss_type flow; add it or drop them$"):
        adapter.refuse_keys_of_other_methods(["flow_tau", "talr_tau"], "talr", FLOW_SWIFT, "--loss_type is 'talr'")
    with pytest.raises(ValueError, match=r"^--eaft_topk set but use_eaft_loss is false: EAFT"):
        adapter.refuse_keys_of_other_methods(["eaft_topk"], "sft_kl", FLOW_SWIFT, "use_{method}_loss is false")
    args = types.SimpleNamespace(eaft_topk=None, flow_tau=0.5, talr_fused=False, retention_steps=3)
    assert adapter.given_method_keys(args) == {"flow_tau": 0.5, "talr_fused": False}


def test_every_method_key_becomes_a_field_with_its_methods_switch_in_the_help():
    from eaft_plugins.options import ALL_METHOD_KEYS

    fields = adapter.setting_fields(FLOW_SWIFT)
    assert set(ALL_METHOD_KEYS) <= set(fields)
    assert fields["talr_min_weight"][1].startswith("TALR (--loss_type talr): floor of a token's weight")
    assert fields["flow_tau"][1].endswith("(default median)") and fields["flow_tau"][2] is None
