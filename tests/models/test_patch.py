"""patch_model_for_fused_eaft on the real SmolLM2 (Llama) and tiny random Llama / Qwen2 / Qwen3 models, on the test device."""

import pytest
import torch

from eaft_plugins import eaft_loss
from eaft_plugins.models import patch_model_for_fused_eaft
from reference import DEVICE, DTYPES, IGNORE, ON_CPU, reference_loss, tol


@pytest.fixture(scope="module")
def smollm2(request):
    """SmolLM2 in fp32 on DEVICE. Its GGUF wheel is too big to carry to the device machine, so
    there (only) a missing model skips; the tiny random Llama below covers the family."""
    from transformers import AutoModelForCausalLM

    try:
        path = request.getfixturevalue("smollm2_dir")
    except FileNotFoundError as exc:
        if ON_CPU:
            raise
        pytest.skip(f"SKIPPED on {DEVICE}: SmolLM2 is not available here ({exc})")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEVICE)


def tiny(family, dtype=torch.float32):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **common))
    return model.to(DEVICE, dtype)


def twin(model):
    import copy

    return copy.deepcopy(model)


def batch(vocab, b=2, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE  # prompt
    labels[-1, t - 5 :] = IGNORE  # padding
    return ids.to(DEVICE), labels.to(DEVICE)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, rtol=1e-4):
    assert a.keys() == b.keys() and a
    for name in a:
        scale = a[name].abs().max().clamp_min(1e-12)
        err = (a[name] - b[name]).abs().max() / scale
        assert err < rtol, (name, float(err))


def float64_reference(model, ids, labels, **loss_kwargs):
    """The dense EAFT loss of a float64 copy of the model on the CPU (shared float64 reference)."""
    kw = dict(loss_kwargs)
    if "num_items_in_batch" in kw:
        kw["num_items"] = kw.pop("num_items_in_batch")
    with torch.no_grad():
        logits = twin(model).to("cpu", torch.float64)(input_ids=ids.cpu()).logits
    return reference_loss(logits, labels, **kw)[0]


def check_against_dense(model, ids, labels, rtol=1e-3, f64=True, **loss_kwargs):
    """rtol is relative to each gradient's largest entry: fp32 rounding through 30 layers reaches ~1e-4.
    f64: also check the loss against the float64 model on the CPU."""
    dtype = next(model.parameters()).dtype
    dense_model, fused_model = twin(model), twin(model)
    logits = dense_model(input_ids=ids).logits
    want = eaft_loss(logits, labels, **loss_kwargs)
    want.loss.backward()
    options = {k: v for k, v in loss_kwargs.items() if k not in ("num_items_in_batch", "mean_weight")}
    handle = patch_model_for_fused_eaft(fused_model, options, chunk_size=7)
    handle.mean_weight = loss_kwargs.get("mean_weight")
    kwargs = {"num_items_in_batch": loss_kwargs["num_items_in_batch"]} if "num_items_in_batch" in loss_kwargs else {}
    out = fused_model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    assert out.logits is None
    same = tol(dtype, 1e-5, 1e-6)
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=same["rtol"])
    torch.testing.assert_close(out.eaft_stats.to_vector(), want.stats.to_vector(), **same)
    assert handle.last_stats is out.eaft_stats
    assert_grads_close(grads(fused_model), grads(dense_model), rtol if dtype == torch.float32 else max(rtol, 5e-2))
    if f64:  # bf16 runs the whole model in bf16: its loss is a percent or so off the float64 model's
        want64 = float64_reference(model, ids, labels, **loss_kwargs)
        assert out.loss.item() == pytest.approx(want64, rel=1e-4 if dtype == torch.float32 else 3e-2)
    return out


def test_smollm2_patched_loss_and_grads_equal_dense(smollm2):
    model = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.lm_head.weight is model.model.embed_tokens.weight
    ids, labels = batch(model.config.vocab_size)
    check_against_dense(model, ids, labels, f64=False, num_items_in_batch=40)  # the tiny models carry the float64 check


def test_smollm2_options_and_mean_weight(smollm2):
    model = smollm2
    ids, labels = batch(model.config.vocab_size, seed=1)
    check_against_dense(model, ids, labels, f64=False, topk=7, alpha=0.5, weight_norm="mean")  # micro-batch mean: two passes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tiny_models_patched_equal_dense(family, dtype):
    model = tiny(family, dtype)
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                    "qwen3": "Qwen3ForCausalLM"}[family]
    ids, labels = batch(96)
    check_against_dense(model, ids, labels)
    check_against_dense(model, ids, labels, gate="hard", h_min=0.9, p_min=0.5, num_items_in_batch=11)
    check_against_dense(model, ids, labels, weight_norm="mean", mean_weight=0.42)


def test_mean_weight_callable_and_shift_labels_kwarg():
    model = tiny("qwen2")
    ids, labels = batch(96, seed=2)
    handle = patch_model_for_fused_eaft(twin(model), weight_norm="mean")
    handle.mean_weight = lambda: 0.25
    got = handle.model(input_ids=ids, labels=labels).loss
    want = eaft_loss(model(input_ids=ids).logits, labels, weight_norm="mean", mean_weight=0.25).loss
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    again = handle.model(input_ids=ids, shift_labels=shifted).loss
    assert again.item() == pytest.approx(want.item(), rel=1e-5)


def test_without_labels_the_original_forward_runs_and_unpatch_restores():
    model = tiny("qwen3")
    ids, labels = batch(96)
    ref = model(input_ids=ids).logits
    handle = patch_model_for_fused_eaft(model)
    torch.testing.assert_close(model(input_ids=ids).logits, ref)
    with torch.no_grad():
        assert model(input_ids=ids, labels=labels).logits is None
    handle.keep_logits = True
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, labels=labels).logits, ref)
    handle.unpatch()
    out = model(input_ids=ids, labels=labels)  # transformers' own cross-entropy again
    assert out.logits is not None and not hasattr(out, "eaft_stats")


def test_a_denied_family_raises_naming_the_reason():
    """Families are read from their forward (tests/models/test_families.py); a denied one says why."""
    import transformers

    config = transformers.BartConfig(vocab_size=50, d_model=16, decoder_layers=1, encoder_layers=1, decoder_ffn_dim=16,
                                     encoder_ffn_dim=16, decoder_attention_heads=2, encoder_attention_heads=2)
    bart = transformers.BartForCausalLM(config).to(DEVICE)
    with pytest.raises(ValueError, match="fused EAFT does not support BartForCausalLM: the decoder of an encoder-decoder"):
        patch_model_for_fused_eaft(bart)


def test_peft_lora_model_is_patched_through_the_wrapper(smollm2):
    peft = pytest.importorskip("peft", reason="SKIPPED: peft is not installed")
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False)
    base = twin(smollm2)
    torch.manual_seed(3)
    dense = peft.get_peft_model(base, config)
    fused = twin(dense)
    ids, labels = batch(base.config.vocab_size, seed=3)
    eaft_loss(dense(input_ids=ids).logits, labels).loss.backward()
    handle = patch_model_for_fused_eaft(fused)
    assert handle.model is fused.get_base_model()
    out = fused(input_ids=ids, labels=labels)
    out.loss.backward()
    assert out.logits is None
    assert_grads_close(grads(fused), grads(dense), rtol=1e-3)


def test_lora_on_lm_head_raises():
    peft = pytest.importorskip("peft", reason="SKIPPED: peft is not installed")
    model = peft.get_peft_model(tiny("qwen2"), peft.LoraConfig(target_modules=["q_proj", "lm_head"], r=2))
    with pytest.raises(ValueError, match="needs a plain nn.Linear lm_head"):
        patch_model_for_fused_eaft(model)


@pytest.mark.e2e
def test_hf_trainer_passes_num_items_in_batch(tmp_path):
    """A real transformers Trainer step: the patched forward gets num_items_in_batch and trains."""
    import transformers

    model = tiny("qwen2")
    before = model.lm_head.weight.detach().cpu().clone()
    patch_model_for_fused_eaft(model)
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs.get("num_items_in_batch")), with_kwargs=True)
    rows = []
    for seed in range(4):
        ids, labels = batch(96, b=1, t=12, seed=seed)
        rows.append({"input_ids": ids[0].cpu(), "labels": labels[0].cpu()})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=ON_CPU, logging_steps=1,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    assert trainer.model_accepts_loss_kwargs
    result = trainer.train()
    total = sum(int((r["labels"] != IGNORE).sum()) for r in rows)
    assert [int(n) for n in seen] == [total, total]
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.lm_head.weight.detach().cpu(), before)
