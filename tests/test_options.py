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
