"""The one option schema: every setting parsed from what users write, every bad value refused naming its key."""

import math

import pytest

from eaft_plugins.options import (KEYS, RETENTION_SETTINGS, SETTINGS, SETTINGS_BY_KEY, USER_SETTINGS, EAFTConfig,
                                  EAFTOptions, Spelling, check_option, config_from_keys, make_options, parse_bool)

LF = Spelling("LLaMA-Factory key `{key}`", "`{key}: {value}`", "`use_eaft_loss: true`")
TRL = Spelling("SFTConfig field `{key}` (--{key})", "{key}={value}", 'loss_type="eaft"', python_values=True)


def test_every_user_setting_has_a_key_a_kind_and_help():
    assert [s.key for s in SETTINGS] == list(KEYS)
    assert {s.key for s in RETENTION_SETTINGS} == {"retention_probe", "retention_steps"}
    assert len(SETTINGS_BY_KEY) == len(USER_SETTINGS)  # no key twice
    for s in USER_SETTINGS:
        assert s.help and s.kind in ("topk", "tau", "float", "choice", "bool", "probe", "steps")
        assert s.key.startswith(f"{s.method}_") == (s.group != "retention")  # eaft_topk, flow_tau, retention_probe
    assert {s.key for s in SETTINGS if s.trainer} == {"eaft_log_metrics", "eaft_fused"}


def test_the_defaults_are_the_papers():
    config = config_from_keys({})
    assert config == EAFTConfig() and config.options == EAFTOptions()
    assert (config.options.topk, config.options.alpha, config.options.entropy_norm) == (20, 1.0, "ln_k")
    assert config.options.entropy_divisor(49152) == pytest.approx(math.log(20))
    assert (config.fused, config.log_metrics) == (False, True)
    assert [s.default_text for s in RETENTION_SETTINGS] == ["off", "auto"]


@pytest.mark.parametrize("key, written, parsed", [
    ("eaft_topk", "12", 12), ("eaft_topk", 7, 7), ("eaft_topk", "full", None), ("eaft_topk", " FULL ", None),
    ("eaft_alpha", "0.5", 0.5), ("eaft_alpha", 2, 2.0), ("eaft_h_min", "0", 0.0), ("eaft_p_min", "1", 1.0),
    ("eaft_gate", "hard", "hard"), ("eaft_entropy_norm", "upstream", "upstream"), ("eaft_weight_norm", "mean", "mean"),
])
def test_what_users_write_is_parsed(key, written, parsed):
    options = config_from_keys({key: written}).options
    assert getattr(options, SETTINGS_BY_KEY[key].name) == parsed


@pytest.mark.parametrize("written, value", [(True, True), ("TRUE", True), ("1", True), (1, True), ("false", False),
                                            (" False ", False), ("0", False), (0, False)])
def test_booleans_take_their_usual_spellings(written, value):
    assert config_from_keys({"eaft_fused": written}).fused is value
    assert parse_bool(written, "x") is value


@pytest.mark.parametrize("key, written, allowed", [
    ("eaft_topk", 1, "an integer >= 2 or 'full'"), ("eaft_topk", "twenty", "an integer >= 2 or 'full'"),
    ("eaft_topk", 2.5, "an integer >= 2 or 'full'"), ("eaft_topk", True, "an integer >= 2 or 'full'"),
    ("eaft_alpha", -0.1, ">= 0.0"), ("eaft_alpha", "nan", "a finite number"), ("eaft_alpha", "much", "a finite number"),
    ("eaft_h_min", float("inf"), "a finite number"), ("eaft_p_min", 1.5, "in [0.0, 1.0]"),
    ("eaft_gate", "sharp", "['soft', 'hard', 'shuffle']"), ("eaft_entropy_norm", "log", "['ln_k', 'upstream', 'none']"),
    ("eaft_weight_norm", "sum", "['none', 'mean']"), ("eaft_fused", "maybe", "must be true or false"),
    ("eaft_log_metrics", 2, "must be true or false"),
])
def test_a_bad_value_names_the_key_as_the_framework_writes_it(key, written, allowed):
    with pytest.raises(ValueError) as err:
        config_from_keys({key: written}, LF)
    message = str(err.value)
    assert message.startswith(f"LLaMA-Factory key `{key}` {written!r} is invalid: ")
    assert allowed in message


def test_an_unknown_key_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown EAFT setting\(s\) \['--eaft_topkk'\]; allowed: \['--eaft_topk'"):
        config_from_keys({"eaft_topkk": 3}, Spelling("--{key}"))
    with pytest.raises(ValueError, match="unknown EAFT setting"):  # retention keys are not EAFT settings
        config_from_keys({"retention_probe": "builtin"})


def test_spelling_shows_and_assigns_any_key_in_the_frameworks_words():
    assert LF.shown("eaft_topk") == "LLaMA-Factory key `eaft_topk`"
    assert LF.assign("eaft_fused", True) == "`eaft_fused: true`" and TRL.assign("eaft_fused", True) == "eaft_fused=True"
    assert Spelling("--{dashed}").shown("eaft_h_min") == "--h-min"
    assert TRL.shown("use_liger_kernel") == "SFTConfig field `use_liger_kernel` (--use_liger_kernel)"
    assert Spelling("--{key}", "--{key} {value}").assign("retention_probe", "builtin") == "--retention_probe builtin"


def test_options_refuse_bad_values_directly():
    with pytest.raises(ValueError, match=r"^alpha must be >= 0.0, got -1"):
        EAFTOptions(alpha=-1)
    with pytest.raises(ValueError, match=r"^chunk_size must be a positive integer or None, got 0"):
        EAFTOptions(chunk_size=0)
    with pytest.raises(ValueError, match=r"^ignore_index must be an integer"):
        check_option("ignore_index", "x")
    with pytest.raises(TypeError, match="options must be EAFTOptions, dict or None"):
        make_options([1])
    with pytest.raises(ValueError, match=r"unknown EAFT option\(s\) \['k'\]"):
        make_options(k=3)
    assert EAFTOptions(topk="full").topk is None
    assert make_options(EAFTOptions(topk=5), alpha=0.5) == EAFTOptions(topk=5, alpha=0.5)


def test_vocabulary_and_divisors():
    with pytest.raises(ValueError, match=r"topk=64 is larger than the vocabulary \(30\); use topk <= 30"):
        EAFTOptions(topk=64).check_vocab(30)
    assert EAFTOptions(entropy_norm="upstream").entropy_divisor(100) == 3.0
    assert EAFTOptions(entropy_norm="none").entropy_divisor(100) == 1.0
    assert EAFTOptions(topk=None).entropy_divisor(100) == pytest.approx(math.log(100))
    assert EAFTOptions().rows_per_chunk(1 << 20) == 16 and EAFTOptions(chunk_size=3).rows_per_chunk(10) == 3


# ---- the math table's other losses: SFT-KL, FLOW, TALR


def test_every_method_has_its_keys_and_two_trainer_settings():
    from eaft_plugins.options import METHOD_KEYS, METHODS

    assert list(METHODS) == ["eaft", "sft_kl", "flow", "talr"]
    assert METHOD_KEYS["sft_kl"] == ("sft_kl_beta", "sft_kl_direction", "sft_kl_log_metrics", "sft_kl_fused")
    assert METHOD_KEYS["flow"] == ("flow_tau", "flow_log_metrics", "flow_fused")
    assert METHOD_KEYS["talr"] == ("talr_tau", "talr_min_weight", "talr_log_metrics", "talr_fused")
    assert [m for m, method in METHODS.items() if not method.fused] == ["sft_kl"]


def test_method_defaults():
    from eaft_plugins.options import FLOWOptions, SFTKLOptions, TALROptions

    assert config_from_keys({}, method="sft_kl").options == SFTKLOptions(beta=0.5, direction="forward")
    assert config_from_keys({}, method="flow").options == FLOWOptions(tau=None)  # the median
    assert config_from_keys({}, method="talr").options == TALROptions(tau=None, min_weight=0.01)
    for method in ("sft_kl", "flow", "talr"):
        config = config_from_keys({}, method=method)
        assert (config.method, config.fused, config.log_metrics) == (method, False, True)
    assert [SETTINGS_BY_KEY[k].default_text for k in ("flow_tau", "talr_tau", "sft_kl_beta")] == ["median", "median",
                                                                                                    "0.5"]


@pytest.mark.parametrize("method, key, written, parsed", [
    ("sft_kl", "sft_kl_beta", "0.2", 0.2), ("sft_kl", "sft_kl_beta", 0, 0.0),
    ("sft_kl", "sft_kl_direction", "reverse", "reverse"),
    ("flow", "flow_tau", "0.7", 0.7), ("flow", "flow_tau", 2, 2.0), ("flow", "flow_tau", "median", None),
    ("flow", "flow_tau", " Median ", None),
    ("talr", "talr_tau", "1e-2", 0.01), ("talr", "talr_min_weight", "0", 0.0), ("talr", "talr_min_weight", 1, 1.0),
])
def test_method_keys_are_parsed(method, key, written, parsed):
    options = config_from_keys({key: written}, method=method).options
    assert getattr(options, SETTINGS_BY_KEY[key].name) == parsed


@pytest.mark.parametrize("method, key, written, allowed", [
    ("sft_kl", "sft_kl_beta", -0.5, ">= 0.0"), ("sft_kl", "sft_kl_beta", "nan", "a finite number"),
    ("sft_kl", "sft_kl_direction", "both", "['forward', 'reverse']"),
    ("flow", "flow_tau", 0, "a positive number or 'median'"), ("flow", "flow_tau", -1, ">= 0.0"),
    ("flow", "flow_tau", "mean", "a positive number or 'median'"), ("flow", "flow_tau", "inf", "a finite number"),
    ("talr", "talr_tau", "hot", "a positive number or 'median'"), ("talr", "talr_min_weight", 1.5, "in [0.0, 1.0]"),
    ("talr", "talr_fused", "maybe", "must be true or false"), ("flow", "flow_log_metrics", 3, "must be true or false"),
    ("sft_kl", "sft_kl_fused", True, "SFT-KL has no fused path"),
])
def test_a_bad_method_value_names_the_key(method, key, written, allowed):
    with pytest.raises(ValueError) as err:
        config_from_keys({key: written}, LF, method=method)
    assert str(err.value).startswith(f"LLaMA-Factory key `{key}` {written!r} is invalid: ") and allowed in str(err.value)


def test_a_key_of_another_method_is_unknown_to_this_one():
    with pytest.raises(ValueError, match=r"unknown TALR setting\(s\) \['--flow_tau'\]; allowed: \['--talr_tau'"):
        config_from_keys({"flow_tau": 1.0}, Spelling("--{key}"), method="talr")
    with pytest.raises(ValueError, match=r"unknown FLOW setting\(s\) \['--eaft_topk'\]"):
        config_from_keys({"eaft_topk": 20}, Spelling("--{key}"), method="flow")


def test_method_records_refuse_bad_values_directly():
    from eaft_plugins.options import FLOWOptions, SFTKLOptions, TALROptions, make_method_options

    with pytest.raises(ValueError, match=r"^beta must be >= 0.0, got -1"):
        SFTKLOptions(beta=-1)
    with pytest.raises(ValueError, match=r"^tau must be a positive number or 'median', got 0"):
        FLOWOptions(tau=0)
    with pytest.raises(ValueError, match=r"^min_weight must be in \[0.0, 1.0\]"):
        TALROptions(min_weight=-0.1)
    with pytest.raises(ValueError, match=r"unknown TALR option\(s\) \['beta'\]"):
        make_method_options(TALROptions, beta=1)
    assert FLOWOptions(tau="median").tau is None and TALROptions(tau=3).tau == 3


def test_spelling_for_another_method():
    swift = Spelling("--{key}", "--{key} {value}", "--loss_type eaft", method_format="--loss_type {method}")
    assert swift.for_method("flow").enabled == "--loss_type flow" and swift.for_method("flow").method == "flow"
    assert swift.for_method("eaft") is swift
    assert Spelling("--{dashed}").shown("sft_kl_beta") == "--beta"  # the method's prefix, not just eaft_
