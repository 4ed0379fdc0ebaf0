"""EAFTRun, the trainer side every integration shares, against the core loss."""

import pytest
import torch
import torch.nn as nn

from eaft_plugins import eaft_loss
from eaft_plugins.options import EAFTConfig, EAFTOptions, Spelling
from eaft_plugins.run import EAFTRun, metric_names, metric_pairs

IGNORE = -100


def batch(seed, b=2, t=10, v=30):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :3] = IGNORE
    return logits, labels


def test_dense_loss_is_the_core_loss_and_its_stats_are_logged():
    run = EAFTRun(EAFTConfig(EAFTOptions(topk=5, alpha=0.5)))
    logits, labels = batch(0)
    got = run.dense_loss(logits, labels, training=True, step=0, num_items_in_batch=9)
    want = eaft_loss(logits, labels, topk=5, alpha=0.5, num_items_in_batch=9)
    assert got.item() == pytest.approx(want.loss.item(), rel=1e-7)
    logs = run.metrics("train", reduce=False)
    assert logs["eaft/ce"] == pytest.approx(want.stats.means()["eaft/ce"], rel=1e-9)
    assert logs["eaft/tokens"] == float(want.stats.tokens)
    assert run.metrics("train", reduce=False) == {"eaft/tokens": 0.0}  # popped: nothing since


def test_an_all_masked_interval_logs_the_count_and_no_means():
    run = EAFTRun(EAFTConfig())
    logits, labels = batch(1)
    labels[:] = IGNORE
    loss = run.dense_loss(logits.requires_grad_(), labels, training=False, step=0)
    loss.backward()  # zero loss with a graph
    assert loss.item() == 0.0
    logs = run.metrics("eval", reduce=False)
    assert logs == {"eval_eaft/tokens": 0.0}
    assert not set(metric_names("eval")) & set(logs)


def test_weight_norm_mean_one_rule_for_train_and_eval():
    """Step s divides by step s-1's mean raw weight over all its micro-batches; eval uses the same divisor."""
    run = EAFTRun(EAFTConfig(EAFTOptions(weight_norm="mean")))
    (a, la), (b, lb), (c, lc) = batch(2), batch(3), batch(4)
    run.dense_loss(a, la, training=True, step=0)  # step 0: two micro-batches, each its own mean
    run.dense_loss(b, lb, training=True, step=0)
    assert run.mean_weight is None
    step1 = run.dense_loss(c, lc, training=True, step=1)
    raw = [eaft_loss(x, y).stats for x, y in ((a, la), (b, lb))]
    mean0 = float(sum(s.raw_weight_sum for s in raw) / sum(s.tokens for s in raw))
    assert run.mean_weight == pytest.approx(mean0, rel=1e-9)
    assert step1.item() == pytest.approx(eaft_loss(c, lc, weight_norm="mean", mean_weight=mean0).loss.item(), rel=1e-6)
    evaluated = run.dense_loss(a, la, training=False, step=1)  # eval: the last training step's divisor
    assert evaluated.item() == pytest.approx(eaft_loss(a, la, weight_norm="mean", mean_weight=mean0).loss.item(),
                                             rel=1e-6)


def test_topk_above_the_vocabulary_names_the_frameworks_key():
    run = EAFTRun(EAFTConfig(EAFTOptions(topk=64)), Spelling("--{key}", "--{key} {value}"))

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(4, 30)

        def get_output_embeddings(self):
            return self.lm_head

    with pytest.raises(ValueError, match=r"^--eaft_topk: topk=64 is larger than the vocabulary \(30\)"):
        run.check_vocab(LM())
    EAFTRun(EAFTConfig(EAFTOptions(topk=30))).check_vocab(LM())  # equal is fine
    with pytest.raises(ValueError, match=r"^--eaft_topk: topk=64 is larger than the vocabulary \(30\)"):
        run.check_vocab_size(30)


def test_missing_logits_and_a_bypassed_fused_forward_are_errors():
    run = EAFTRun(EAFTConfig(), Spelling("SFTConfig field `{key}`", "{key}={value}", python_values=True))
    with pytest.raises(ValueError, match=r"needs the model's logits.*set eaft_fused=True"):
        run.dense_loss(None, torch.zeros(1, 4, dtype=torch.long), training=True, step=0)

    class Model(nn.Module):
        pass

    class Handle:
        last_stats = None
        keep_logits = False
        model = Model()

    run.fused = Handle()
    run._forward = Handle.model.forward = lambda: None
    Handle.model.eaft_fused = run.fused
    with pytest.raises(ValueError, match=r"eaft_fused=True: the batch has no labels"):
        run.fused_forward(True, 0, None, None, lambda: None)
    with pytest.raises(RuntimeError, match=r"eaft_fused=True: the model's forward did not run the fused EAFT loss"):
        run.fused_forward(True, 0, None, torch.zeros(1, 4), lambda: None)


def test_log_adds_train_metrics_to_a_loss_entry_and_eval_metrics_to_an_eval_entry():
    run = EAFTRun(EAFTConfig())
    logits, labels = batch(5)
    run.dense_loss(logits, labels, training=True, step=0)
    run.dense_loss(logits, labels, training=False, step=0)
    summary = {"train_runtime": 1.0}
    run.log(summary)  # neither a step nor an evaluation: nothing popped
    assert summary == {"train_runtime": 1.0}
    train, evaluation = {"loss": 1.0}, {"eval_loss": 1.0}
    run.log(train)
    run.log(evaluation)
    assert set(metric_names("train")) <= set(train) and set(metric_names("eval")) <= set(evaluation)
    assert train["eaft/tokens"] == evaluation["eval_eaft/tokens"] == float((labels[:, 1:] != IGNORE).sum())
    quiet = EAFTRun(EAFTConfig(log_metrics=False))
    quiet.dense_loss(logits, labels, training=True, step=0)
    entry = {"loss": 1.0}
    quiet.log(entry)
    assert entry == {"loss": 1.0}


def test_take_and_metric_pairs_for_frameworks_that_log_per_micro_batch():
    run = EAFTRun(EAFTConfig(), Spelling(enabled="--loss_type eaft"))
    with pytest.raises(RuntimeError, match=r"^--loss_type eaft is set but the model's forward did not compute"):
        run.take(training=True)
    logits, labels = batch(6)
    run.dense_loss(logits, labels, training=True, step=0)
    stats = run.take(training=True)
    pairs = metric_pairs(stats)
    assert list(pairs) == list(metric_names("train"))
    total, tokens = pairs["eaft/ce"]
    assert float(total / tokens) == pytest.approx(stats.means()["eaft/ce"])
    assert run.acc["train"].empty


# ---- the same run for SFT-KL, FLOW and TALR


def method_run(method, **options):
    from eaft_plugins.options import config_from_keys

    return EAFTRun(config_from_keys({f"{method}_{k}": v for k, v in options.items()}, method=method))


class Echo(nn.Module):
    """A "model" whose logits are a fixed tensor times a learnable temperature (the starting model: 1)."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.scale = logits, nn.Parameter(torch.ones(()))

    def forward(self, input_ids=None, attention_mask=None, use_cache=None):
        return {"logits": self.logits[: input_ids.shape[0]] * self.scale}


def test_each_method_runs_its_op_and_logs_its_metrics():
    from eaft_plugins.ops.flow import flow_loss, flow_weights, sequence_losses
    from eaft_plugins.ops.sft_kl import sft_kl_loss
    from eaft_plugins.ops.talr import talr_loss
    from eaft_plugins.reference import FlowTable, StartingModel

    logits, labels = batch(5)
    inputs = {"input_ids": labels.clamp_min(0), "labels": labels}
    model = Echo(logits)
    run = method_run("sft_kl", beta=0.3)
    run.starting_model = StartingModel(model)
    with torch.no_grad():
        model.scale *= 1.5  # trained away from the start: the frozen copy still gives the starting logits
    run.prepare(model, inputs, training=True)
    got = run.dense_loss(logits * 1.5, labels, training=True, step=0)
    want = sft_kl_loss(logits * 1.5, labels, logits, beta=0.3)
    assert float(want.stats.kl_sum) > 0 and got.item() == pytest.approx(want.loss.item(), rel=1e-6)

    run = method_run("flow", tau=0.5)
    run.flow_table = FlowTable(0.5)
    run.flow_table.measure(model, [inputs])
    run.flow_table.finish()
    run.prepare(model, inputs, training=True)
    got = run.dense_loss(logits, labels, training=True, step=0, num_items_in_batch=20)
    weights = flow_weights(sequence_losses(logits * 1.5, labels), 0.5)[0]  # measured on the model given
    want = flow_loss(logits, labels, weights, num_items_in_batch=20)
    assert got.item() == pytest.approx(want.loss.item(), rel=1e-6)
    assert run.metrics("train", reduce=False)["flow/weight"] == pytest.approx(want.stats.means("f/")["f/weight"])
    run.prepare(model, inputs, training=False)  # evaluation weighs every row 1
    assert run.dense_loss(logits, labels, training=False, step=0).item() == pytest.approx(
        flow_loss(logits, labels, torch.ones(2)).loss.item(), rel=1e-6)

    run = method_run("talr", min_weight=0.2)
    got = run.dense_loss(logits, labels, training=True, step=0)
    assert got.item() == pytest.approx(talr_loss(logits, labels, min_weight=0.2).loss.item(), rel=1e-7)
    logs = run.metrics("train", reduce=False)
    assert set(logs) == {"talr/ce", "talr/weight", "talr/tau", "talr/tokens"}


@pytest.mark.parametrize("method", ["sft_kl", "flow"])
def test_a_loss_without_its_prepared_inputs_is_an_error(method):
    logits, labels = batch(6)
    run = method_run(method)
    assert run.needs_inputs
    with pytest.raises(RuntimeError, match="was not set up when the trainer was built|were not measured"):
        run.prepare(Echo(logits), {"input_ids": labels.clamp_min(0), "labels": labels}, training=True)
    with pytest.raises(RuntimeError, match=r"the loss ran without the .* of its micro-batch"):
        run.dense_loss(logits, labels, training=True, step=0)


@pytest.mark.parametrize("method", ["sft_kl", "flow", "talr"])
def test_an_all_masked_micro_batch_is_a_zero_loss_with_a_graph_for_every_method(method):
    logits, labels = batch(7)
    labels[:] = IGNORE
    run = method_run(method)
    run._pending = {"sft_kl": logits.clone(), "flow": torch.ones(2)}.get(method)
    x = logits.clone().requires_grad_()
    loss = run.dense_loss(x, labels, training=True, step=0)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    assert run.metrics("train", reduce=False) == {f"{method}/tokens": 0.0}


def test_flow_row_keys_ignore_padding_and_a_cut_of_unsupervised_labels():
    from eaft_plugins.reference import row_keys

    ids = torch.tensor([[5, 6, 7, 8, 0, 0]])
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, IGNORE, IGNORE]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    key = row_keys({"input_ids": ids, "labels": labels, "attention_mask": mask})
    assert row_keys({"input_ids": ids[:, :4], "labels": labels[:, :4]}) == key  # no padding
    assert row_keys({"input_ids": ids, "labels": labels[:, 2:], "attention_mask": mask}) == key  # ms-swift's cut
    assert row_keys({"input_ids": ids, "labels": labels.roll(1), "attention_mask": mask}) != key


def test_flows_pass_never_leaves_the_training_set_as_the_cached_evaluation_loader():
    """Trainer caches its evaluation loader under dataloader_persistent_workers, keyed "eval" whatever the dataset."""
    from eaft_plugins.integrations.methods import _training_rows

    class Trainer:
        train_dataset, eval_dataset = "train rows", "eval rows"

        def __init__(self):
            self._eval_dataloaders = {"eval": "the evaluation loader"}

        def get_eval_dataloader(self, dataset=None):
            if "eval" in self._eval_dataloaders:
                return self._eval_dataloaders["eval"]
            self._eval_dataloaders["eval"] = f"loader of {dataset}"
            return self._eval_dataloaders["eval"]

    trainer = Trainer()
    assert _training_rows(trainer) == "loader of train rows"
    assert trainer._eval_dataloaders == {"eval": "the evaluation loader"}
    fresh = Trainer()
    fresh._eval_dataloaders = {}
    _training_rows(fresh)
    assert fresh._eval_dataloaders == {}  # nothing cached


def test_the_frozen_copy_runs_its_own_forward_not_a_wrapper_of_the_trained_model():
    """A trainer may set an instance forward whose closure calls the model (TRL 1.x): a deep copy keeps that function
    by reference, so the copy would follow the training."""
    from eaft_plugins.reference import StartingModel

    logits, labels = batch(8)
    model = Echo(logits)
    original = model.forward
    model.forward = lambda *a, **k: original(*a, **k)
    start = StartingModel(model)
    with torch.no_grad():
        model.scale *= 2.0
    torch.testing.assert_close(start.logits(model, {"input_ids": labels.clamp_min(0), "labels": labels}), logits)


def test_flow_weighs_an_all_masked_row_without_looking_it_up():
    """measure() skips a row with no supervised token; the same row in training must not stop the run."""
    from eaft_plugins.reference import FlowTable

    logits, labels = batch(9)
    inputs = {"input_ids": labels.clamp_min(0), "labels": labels}
    table = FlowTable()
    table.measure(Echo(logits), [inputs])
    table.finish()
    masked = dict(inputs, labels=torch.full_like(labels, IGNORE))
    run = method_run("flow")
    run.flow_table = table
    run.prepare(Echo(logits), masked, training=True)
    x = logits.clone().requires_grad_()
    loss = run.dense_loss(x, masked["labels"], training=True, step=0)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


def test_a_fused_refusal_names_the_methods_key_and_title():
    run = method_run("talr", fused=True)
    with pytest.raises(ValueError, match=r"^talr_fused: true: fused TALR needs a plain nn.Linear lm_head.*or set "
                                         r"talr_fused: false \(TALR on the model's logits\)"):
        run.patch_fused(model_without_a_plain_head())


def model_without_a_plain_head():
    import transformers

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False))
    model.lm_head = nn.Sequential(model.lm_head)  # not a plain nn.Linear
    return model
