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
