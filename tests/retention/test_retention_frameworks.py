"""The retention keys through the frameworks' real parsers: they work without EAFT, and a bad value stops before
training naming the key. The monitor in real runs rides on the frameworks' end-to-end runs (the plain-SFT run of
tests/integrations/test_llamafactory.py and test_swift_e2e.py, the TRL and plain-Trainer scenarios of test_trl.py,
the DDP / ZeRO-3 runs of test_zero3.py)."""

import pytest

from eaft_plugins.tools.demo import train_config, write_dataset

PROBE = ['{"prompt": "Name a colour."}', '{"prompt": "Say hello in French."}',
         '{"text": "The Moon is Earth\'s only natural satellite. It causes the tides."}',
         '{"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Madrid"], "answer": 0}']


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    p = tmp_path_factory.mktemp("probe") / "probe.jsonl"
    p.write_text("\n".join(PROBE) + "\n")
    return str(p)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ret_data"), 16, seed=3)


# ---------------------------------------------------------------- LLaMA-Factory parser (no training)

llamafactory = pytest.importorskip("llamafactory", reason="SKIPPED: llamafactory is not installed in this environment")


def parse(smollm2_dir, data_dir, tmp_path, **kw):
    from llamafactory.hparams import get_train_args

    return get_train_args(train_config(smollm2_dir, data_dir, tmp_path / "out", steps=1, eaft=False, **kw))


def test_lf_keys_work_without_eaft(smollm2_dir, data_dir, tmp_path, probe):
    finetuning_args = parse(smollm2_dir, data_dir, tmp_path, retention_probe=probe, retention_steps=5)[3]
    assert finetuning_args.retention_probe == probe and finetuning_args.retention_steps == 5
    assert finetuning_args.use_eaft_loss is False


@pytest.mark.parametrize("kw, match", [
    ({"retention_probe": "/nonexistent/probe.jsonl"}, r"LLaMA-Factory key `retention_probe`: probe file '/nonexistent"),
    ({"retention_steps": 5}, r"LLaMA-Factory key `retention_steps` is set but `retention_probe` is not: add "
                             r"`retention_probe: builtin` \(or a probe file\) or drop `retention_steps`"),
    ({"retention_probe": "builtin", "retention_steps": 0}, r"LLaMA-Factory key `retention_steps` must be an integer"),
    ({"retention_probe": "builtin", "stage": "pt"}, r"`retention_probe` needs `stage: sft`"),
])
def test_lf_bad_keys_stop_before_training(smollm2_dir, data_dir, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        parse(smollm2_dir, data_dir, tmp_path, **kw)


def test_lf_malformed_probe_names_the_row(smollm2_dir, data_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl row 2: \"prompt\" must be a non-empty string"):
        parse(smollm2_dir, data_dir, tmp_path, retention_probe=str(bad))


def test_trl_config_refuses_a_missing_probe(tmp_path):
    pytest.importorskip("trl", reason="SKIPPED: trl is not installed in this environment")
    from trl import SFTConfig

    with pytest.raises(ValueError, match=r"SFTConfig field `retention_probe` \(--retention_probe\): probe file"):
        SFTConfig(output_dir=str(tmp_path), retention_probe=str(tmp_path / "none.jsonl"), use_cpu=True,
                  report_to="none")
