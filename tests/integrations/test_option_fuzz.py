"""Malformed values for every setting of the one option schema, through each framework's real parser (issue #21).

For each setting of `options.SETTINGS` and `options.RETENTION_SETTINGS`, hypothesis feeds what a YAML file, a
command line or a Python call can carry (wrong types, out-of-range and non-finite numbers, huge ints, empty and
junk strings, lists, dicts, booleans, unknown choices) through

* LLaMA-Factory 0.9.5: `get_train_args(dict)` (a YAML config; values arrive as YAML typed them),
* ms-swift 4.6: `parse_args(SftArguments, argv)` (`--key=TEXT`: HfArgumentParser converts by the field's type),
* TRL 0.24: `SFTConfig(...)` (Python values), and `with_eaft`'s `settings_from_keywords`.

Each answer is either the value `config_from_keys` (retention: `parse_steps` / `load_rows`) gives for what the
framework handed over, or a ValueError naming the key as that framework spells it (ms-swift: argparse's own
exit 2 naming the flag, when its type conversion refuses the text first); never another exception type, never a
different value. The parsers here run in-process in milliseconds (no trainer, no model load): a fast-lane file.
"""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eaft_plugins.integrations.hf_trainer import SPELLING as HF_SPELLING, settings_from_keywords
from eaft_plugins.options import RETENTION_SETTINGS, SETTINGS, Spelling, config_from_keys, parse_bool
from eaft_plugins.retention.probe import load_rows, parse_steps

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Strings users type, and the ones that crashed a parser before (int() on "--5" and "²", ~unknownuser, a too-long
# file name, an int too large for a float).
TEXTS = ["", " ", "full", "FULL", " full ", "none", "None", "null", "nan", "NaN", "inf", "-inf", "1e400", "-1", "0",
         "1", "2", "20", "+5", "--5", "-5", "²", "１２", "0x10", "1_000", "3.5", " 0.5 ", "true", "false", "yes",
         "TRUE", "t", "soft", "SOFT", " hard", "mean", "ln_k", "upstream", "builtin", "builtin ", "builtin-large",
         "~nosuchuser_eaft/probe.jsonl", "a" * 300, "x\x00y", ".", "[1, 2]", "{}"]
SCALARS = st.one_of(
    st.sampled_from(TEXTS), st.text(max_size=12), st.booleans(), st.integers(-10**6, 10**6),
    st.integers(10**300, 10**400), st.integers(-10**400, -10**300),
    st.floats(allow_nan=True, allow_infinity=True))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))
# Every one of these goes through the schema in each test run; hypothesis explores around them.
CORPUS = TEXTS + [True, False, 0, 1, -1, 2, 2**63, 10**400, -10**400, 0.5, -0.0, 1e-320, float("nan"), float("inf"),
                  float("-inf"), [], [20], ["full"], {}, {"topk": 20}]


def values_for(setting) -> st.SearchStrategy:
    """Junk plus the setting's own words (its choices, with case and blanks changed), so accepted values occur."""
    own = [c for choice in setting.choices for c in (choice, choice.upper(), f" {choice}")]
    return st.one_of(VALUES, st.sampled_from(own)) if own else VALUES


def cli_text(value) -> str:
    """What a user would have typed for `value` on a command line."""
    return value if isinstance(value, str) else str(value)


# ---- the oracle: what the schema says, in a framework's spelling


def expected(key: str, value, spelling: Spelling):
    """config_from_keys' (retention: parse_steps' / load_rows') answer for one written value: the parsed value, or
    None when it refuses, naming the key. Any other exception fails the test here: the schema itself crashed."""
    shown = spelling.shown(key)
    try:
        if key == "retention_steps":
            return parse_steps(value, shown)
        if key == "retention_probe":
            load_rows(value, shown)
            return value
        return config_from_keys({key: value}, spelling)
    except ValueError as exc:
        assert shown in str(exc), f"the error does not name {shown}: {exc}"
        return None


def check(key: str, value, spelling: Spelling, parse, parsed):
    """`parse()` answers as the schema does: the same parsed value, or a ValueError naming the key."""
    want = expected(key, value, spelling)
    if want is None:
        with pytest.raises(ValueError) as err:
            parse()
        assert spelling.shown(key) in str(err.value), f"{key}={value!r}: the error does not name the key: {err.value}"
        return
    assert parsed(parse()) == want, f"{key}={value!r} was parsed to something else than the schema says"


def check_keywords(setting, value, spelling: Spelling, make, eaft: dict, config):
    """`check` for a framework taking the keys as keyword values (LLaMA-Factory's dict config, SFTConfig): an EAFT
    key with `eaft` (what turns EAFT on there), retention_steps with a probe (alone it is refused as such)."""
    key = setting.key
    if setting.group == "retention":
        extra = {"retention_probe": "builtin"} if key == "retention_steps" else {}
        check(key, value, spelling, lambda: make(**{key: value}, **extra), lambda got: retention_value(key, got))
    else:
        check(key, value, spelling, lambda: make(**eaft, **{key: value}), config)


def retention_value(key: str, holder):
    """A framework keeps the retention keys as written; the monitor parses them (parse_steps) when attached."""
    value = getattr(holder, key)
    return parse_steps(value) if key == "retention_steps" else value


ALL = SETTINGS + RETENTION_SETTINGS
IDS = [s.key for s in ALL]


# ---- the schema alone, and with_eaft (the keywords of a plain transformers.Trainer)


def schema_and_with_eaft(setting, value) -> None:
    for spelling in (Spelling(), HF_SPELLING):
        expected(setting.key, value, spelling)  # raises anything but a ValueError naming the key: a crash
    if setting.group != "retention":  # with_eaft takes the EAFT settings (with_retention takes the probe)
        check(setting.key, value, HF_SPELLING, lambda: settings_from_keywords({setting.key: value}), lambda got: got)


@pytest.mark.parametrize("setting", ALL, ids=IDS)
def test_the_schema_on_the_corpus(setting):
    for value in CORPUS + list(setting.choices):
        schema_and_with_eaft(setting, value)


@pytest.mark.parametrize("setting", ALL, ids=IDS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_the_schema_refuses_naming_the_key_or_parses(setting, data):
    schema_and_with_eaft(setting, data.draw(values_for(setting)))


@given(value=VALUES)
@settings(max_examples=100, deadline=None)
def test_parse_bool_refuses_naming_the_key_or_parses(value):
    try:
        assert parse_bool(value, "`use_eaft_loss`") in (True, False)
    except ValueError as exc:
        assert "`use_eaft_loss`" in str(exc)


# ---- regressions: each of these raised something else (or a ValueError without the key) before


LF_SPELLING = Spelling("LLaMA-Factory key `{key}`", "`{key}: {value}`", "`use_eaft_loss: true`")


@pytest.mark.parametrize("key, value, words", [
    ("eaft_alpha", 10**400, "finite"),  # OverflowError: int too large to convert to float (YAML ints are unbounded)
    ("eaft_h_min", -10**400, "finite"),
    ("eaft_topk", "--5", "an integer >= 2"),  # ValueError from int() without the key
    ("eaft_topk", "²", "an integer >= 2"),  # str.isdigit() is true for superscripts, int() refuses them
], ids=["alpha-10**400", "h_min--10**400", "topk---5", "topk-superscript"])
def test_values_that_crashed_the_schema_are_refused_naming_the_key(key, value, words):
    with pytest.raises(ValueError, match=words) as err:
        config_from_keys({key: value}, LF_SPELLING)
    assert f"LLaMA-Factory key `{key}`" in str(err.value)


def test_topk_and_steps_read_what_int_reads():
    """ms-swift's argparse reads `--retention_steps +5` as 5; a YAML "+5" was refused. Now both read it alike."""
    assert config_from_keys({"eaft_topk": " +12 "}).options.topk == 12
    assert parse_steps("+5") == parse_steps(" 5 ") == 5
    with pytest.raises(ValueError, match="retention_steps must be an integer >= 1"):
        parse_steps("²")


@pytest.mark.parametrize("probe, words", [
    ("~nosuchuser_eaft/probe.jsonl", "cannot read the probe file"),  # RuntimeError from Path.expanduser
    ("a" * 300, "File name too long"),  # OSError from Path.is_file
], ids=["unknown-user", "name-too-long"])
def test_unreadable_probe_paths_are_refused_naming_the_key(probe, words):
    with pytest.raises(ValueError, match=words) as err:
        load_rows(probe, "--retention_probe")
    assert str(err.value).startswith("--retention_probe: ")


def test_a_binary_probe_file_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "reference.pt"
    path.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8")  # a pickle header: not UTF-8 text
    with pytest.raises(ValueError, match="cannot read the probe file") as err:
        load_rows(str(path), "`retention_probe`")
    assert str(err.value).startswith("`retention_probe`: ")


# ---- LLaMA-Factory: get_train_args on a dict config (what its YAML loader hands over)


@pytest.fixture(scope="module")
def lf_parse(smollm2_dir, tmp_path_factory):
    pytest.importorskip("llamafactory", reason="SKIPPED: llamafactory is not installed in this environment")
    from llamafactory.hparams import get_train_args

    from eaft_plugins.integrations.llamafactory import SPELLING
    from eaft_plugins.tools.demo import train_config, write_dataset

    assert SPELLING == LF_SPELLING
    data_dir = write_dataset(tmp_path_factory.mktemp("fuzz_data"), 4, seed=1)
    out = tmp_path_factory.mktemp("fuzz_out")

    def parse(**keys):
        return get_train_args(train_config(smollm2_dir, data_dir, out, steps=1, eaft=False, **keys))[3]

    return parse


@pytest.mark.parametrize("setting", ALL, ids=IDS)
@FUZZ
@given(data=st.data())
def test_llamafactory(lf_parse, setting, data):
    check_keywords(setting, data.draw(values_for(setting)), LF_SPELLING, lf_parse, {"use_eaft_loss": True},
                   lambda args: args.eaft_config)


@FUZZ
@given(value=VALUES)
def test_llamafactory_use_eaft_loss(lf_parse, value):
    """LLaMA-Factory's own switch, which the plugin parses (YAML may quote it)."""
    try:
        want = parse_bool(value, "`use_eaft_loss`")
    except ValueError:
        with pytest.raises(ValueError, match="LLaMA-Factory key `use_eaft_loss`"):
            lf_parse(use_eaft_loss=value)
        return
    assert lf_parse(use_eaft_loss=value).use_eaft_loss is want


# ---- ms-swift: parse_args(SftArguments, argv), as `swift sft` parses its command line


@pytest.fixture(scope="module")
def swift_parse(smollm2_dir, tmp_path_factory):
    pytest.importorskip("swift.arguments", reason="SKIPPED: ms-swift is not installed in this environment")
    from swift.arguments import SftArguments
    from swift.utils import parse_args

    out = str(tmp_path_factory.mktemp("fuzz_swift"))
    base = ["--model", str(smollm2_dir), "--model_type", "llama", "--template", "chatml", "--dataset", "d.jsonl",
            "--output_dir", out, "--add_version", "false", "--report_to", "none"]

    def parse(*argv):
        return parse_args(SftArguments, base + list(argv))[0]

    return parse


def swift_handed(setting, text: str):
    """What HfArgumentParser hands SftArguments for `--key=TEXT`: TEXT converted by the field's type (this raises
    where argparse refuses the text itself)."""
    from transformers.hf_argparser import string_to_bool

    return {"float": float, "steps": int, "bool": string_to_bool}.get(setting.kind, str)(text)


@pytest.mark.parametrize("setting", ALL, ids=IDS)
@FUZZ
@given(data=st.data())
def test_swift(swift_parse, setting, data):
    from eaft_plugins.integrations.swift.args import SPELLING

    key, text = setting.key, cli_text(data.draw(values_for(setting)))
    flag = f"--{key}={text}"
    try:
        handed = swift_handed(setting, text)
    except Exception:  # argparse's type conversion refuses it: its own error, exit 2, naming the flag
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
            swift_parse("--loss_type", "eaft", flag)
        assert exit_.value.code == 2 and f"--{key}" in stderr.getvalue(), stderr.getvalue()
        return
    if setting.group == "retention":
        extra = ["--retention_probe", "builtin"] if key == "retention_steps" else []
        check(key, handed, SPELLING, lambda: swift_parse(flag, *extra), lambda args: swift_value(key, args))
    else:
        check(key, handed, SPELLING, lambda: swift_parse("--loss_type", "eaft", flag), swift_config)


def swift_value(key: str, args):
    """A retention key as the monitor will read it; the trainer's TrainingArguments copy carries the same."""
    assert retention_value(key, args.training_args) == retention_value(key, args)
    return retention_value(key, args)


def swift_config(args):
    assert args.training_args.eaft_config == args.eaft_config  # what the loss will use
    return args.eaft_config


# ---- TRL 0.24: SFTConfig(...), as a Python call or TRL's own YAML/CLI parser hands the fields over


@pytest.fixture(scope="module")
def trl_config(tmp_path_factory):
    pytest.importorskip("trl", reason="SKIPPED: TRL is not installed in this environment")
    from trl import SFTConfig

    out = str(tmp_path_factory.mktemp("fuzz_trl"))

    def make(**fields):
        return SFTConfig(output_dir=out, report_to="none", use_cpu=True, **fields)

    return make


@pytest.mark.parametrize("setting", ALL, ids=IDS)
@FUZZ
@given(data=st.data())
def test_trl(trl_config, setting, data):
    from eaft_plugins.integrations.trl import SPELLING

    check_keywords(setting, data.draw(values_for(setting)), SPELLING, trl_config, {"loss_type": "eaft"},
                   lambda config: config.eaft_config)
