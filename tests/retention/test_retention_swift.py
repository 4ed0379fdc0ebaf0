"""`megatron sft` and `swift rlhf` refuse --retention_probe; `swift sft --retention_probe` runs for real in
tests/integrations/test_swift_e2e.py (its plain-SFT run)."""

import types

import pytest


def test_megatron_and_rlhf_refuse_the_probe():
    from eaft_plugins.integrations.swift.args import check_retention

    MegatronSftArguments = type("MegatronSftArguments", (types.SimpleNamespace,), {})
    with pytest.raises(ValueError, match=r"--retention_probe is not supported by `megatron sft`"):
        check_retention(MegatronSftArguments(retention_probe="builtin", retention_steps=None))
    with pytest.raises(ValueError, match=r"not rlhf \(--rlhf_type dpo\)"):
        check_retention(types.SimpleNamespace(retention_probe="builtin", retention_steps=None, rlhf_type="dpo"))
    with pytest.raises(ValueError, match=r"--retention_steps is set but `retention_probe` is not: add --retention_probe "
                                         r"builtin"):
        check_retention(types.SimpleNamespace(retention_probe=None, retention_steps=3))
    assert not check_retention(types.SimpleNamespace(retention_probe=None, retention_steps=None))
