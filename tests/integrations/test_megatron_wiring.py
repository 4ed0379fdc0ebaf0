"""The Megatron wiring on a real megatron-core GPTModel (tensor parallel over gloo, on CPU).

megatron-core's transformer layers need CUDA, but its vocab-parallel output layer and
`compute_language_model_loss` (fused and unfused CE) run on CPU. So each rank builds a real
GPTModel, feeds hidden states to its real `_postprocess` (output layer -> loss, the path
mcore_bridge's GPTModel takes too), and the patched loss is compared with the single-process
core `eaft_loss` on the gathered logits: per-token values, stats and gradients of the sharded
output-layer weight and of the hidden states. ms-swift's Megatron trainer itself imports
mcore_bridge, which needs transformer_engine (CUDA): those parts are skipped here, loudly.
"""

import importlib.util
import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.dist
if importlib.util.find_spec("megatron.core") is None:
    pytest.skip("SKIPPED: megatron-core is not installed (pip install megatron-core==0.16.1)", allow_module_level=True)

IGNORE = -100
VOCAB, HIDDEN, SEQ, BATCH = 64, 16, 8, 2


def _inputs():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=g) * 4
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels[:, :3] = IGNORE
    labels[1, -1] = IGNORE
    return hidden, labels


def _model(world, fusion):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(0)  # the same full weight on every rank; each keeps its vocab rows
    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, use_cpu_initialization=True,
        tensor_model_parallel_size=world, cross_entropy_loss_fusion=fusion, cross_entropy_fusion_impl="native",
        params_dtype=torch.float32, init_method_std=0.3,
    )
    return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                    position_embedding_type="learned_absolute")


def _postprocess(model, hidden, labels):
    ids = torch.zeros(BATCH, SEQ, dtype=torch.long)
    return model._postprocess(hidden, input_ids=ids, position_ids=ids, labels=labels, rotary_pos_emb=None,
                              rotary_pos_cos=None, rotary_pos_sin=None)


def _run(group=None, **opts):
    """The trainer's EAFTRun, as MegatronTrainer.__init__ builds it (megatron.bind) from parsed arguments."""
    from eaft_plugins.integrations.swift import megatron as swift_megatron
    from eaft_plugins.options import EAFTConfig, make_options

    trainer = types.SimpleNamespace(args=types.SimpleNamespace(loss_type="eaft", rlhf_type=None,
                                                               eaft_config=EAFTConfig(make_options(**opts))))
    return swift_megatron.bind(trainer, [], group)


def _gathered_logits(model, hidden, tp):
    """This rank's vocab shard of the logits gathered over the tensor-parallel group: [b, s, V]."""
    from megatron.core import parallel_state

    local = _postprocess(model, hidden, None)  # [b, s, V/tp]
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return local, torch.cat(parts, -1)


def _worker(rank, world, tp, workdir):
    from eaft_plugins.integrations.swift import megatron as swift_megatron

    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world)
    swift_megatron.activate()  # what the ms-swift integration's activate() does
    from megatron.core import parallel_state

    from eaft_plugins import eaft_loss
    from eaft_plugins.activation import status

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    hidden0, labels = _inputs()
    mask = labels != IGNORE
    out = {"patched_before_model_import": list(status("swift").patched)}
    for fusion in (True, False):
        model = _model(tp, fusion)
        weight = model.output_layer.weight
        # Megatron's own CE (EAFT off): the baseline the wrapper must leave untouched.
        swift_megatron.attach([model], None)
        out[f"megatron_ce_{fusion}"] = _postprocess(model, hidden0, labels).detach()
        # EAFT on: per-token weighted CE from the vocab-parallel op; loss_func-style reduction.
        for name, opts in {"default": {}, "alpha0": dict(alpha=0.0), "full": dict(topk=None, gate="hard", h_min=0.3)}.items():
            run = _run(**opts)
            swift_megatron.attach([model], run)
            hidden = hidden0.clone().requires_grad_(True)
            model.zero_grad()
            per_token = _postprocess(model, hidden, labels)
            stats = run.acc["train"].pop(reduce=False)
            ((per_token * mask).sum() / mask.sum()).backward()
            out[f"eaft_{name}_{fusion}"] = dict(
                per_token=per_token.detach(), stats=stats.to_vector(), weight_grad=weight.grad.clone(),
                hidden_grad=hidden.grad.clone(),
            )
            # Reference: the core on the gathered full logits, its logit gradient pushed back through the layer.
            swift_megatron.attach([model], None)
            hidden = hidden0.clone().requires_grad_(True)
            model.zero_grad()
            local, full = _gathered_logits(model, hidden, tp)
            full.requires_grad_(True)
            ref = eaft_loss(full, labels, shift=False, **opts)
            ref.loss.backward()
            shard = VOCAB // tp
            local.backward(full.grad[..., tp_rank * shard:(tp_rank + 1) * shard])
            out[f"ref_{name}_{fusion}"] = dict(
                loss=ref.loss.detach(), stats=ref.stats.to_vector(), weight_grad=weight.grad.clone(),
                hidden_grad=hidden.grad.clone(), full_logits=full.detach(),
            )
    # The trainer's eaft/* metrics (MegatronTrainer.loss_func): [sum, tokens] pairs reduced over data-parallel ranks.
    run = _run(group=dp_group)
    swift_megatron.attach([model], run)
    _postprocess(model, hidden0, labels)
    trainer = types.SimpleNamespace(_eaft=run, unwrapped_models=[model])
    out["metrics"] = swift_megatron.loss_metrics(trainer, (None, None, {}), torch.device("cpu"))[2]
    out["metrics_stats"] = out["eaft_default_False"]["stats"]
    out["dp"] = parallel_state.get_data_parallel_world_size()
    out["weight_norm"] = _weight_norm_steps(model, tp, dp_group, parallel_state.get_data_parallel_rank())
    # Multi-token prediction would route the MTP heads through the same loss: refused.
    swift_megatron.attach([model], _run())
    model.config.mtp_num_layers = 1
    try:
        _postprocess(model, hidden0, labels)
        out["mtp_error"] = None
    except ValueError as exc:
        out["mtp_error"] = str(exc)
    out["patched"] = list(status("swift").patched)
    torch.save(out, os.path.join(workdir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _weight_norm_steps(model, tp, dp_group, dp_rank):
    """weight_norm=mean over two optimizer steps: step 0 has two micro-batches (each its own mean, no divisor yet),
    step 1 divides by step 0's mean raw weight over both micro-batches and every data-parallel rank."""
    from eaft_plugins import eaft_loss
    from eaft_plugins.integrations.swift import megatron as swift_megatron

    run = _run(group=dp_group, weight_norm="mean")
    swift_megatron.attach([model], run)
    got, raw = [], []
    for step, seed in ((0, 10), (0, 11), (1, 12)):
        g = torch.Generator().manual_seed(seed + 100 * dp_rank)  # each data-parallel rank its own rows
        hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=g) * 4
        labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        labels[:, :2] = IGNORE
        run.step = step  # what MegatronTrainer.train_step sets
        with torch.no_grad():
            got.append(_postprocess(model, hidden, labels))
            run.acc["train"].pop(reduce=False)
            swift_megatron.attach([model], None)
            full = _gathered_logits(model, hidden, tp)[1]
            swift_megatron.attach([model], run)
        raw.append((full, labels))
    sums = torch.stack([eaft_loss(z, y, shift=False).stats.to_vector() for z, y in raw[:2]]).sum(0)
    dist.all_reduce(sums, group=dp_group)
    mean0 = float(sums[5] / sums[4])  # raw_weight_sum / tokens over both micro-batches and data-parallel ranks
    def mean_loss(per_token, labels):  # what loss_func makes of the per-token losses
        return per_token.sum() / (labels != IGNORE).sum()

    z, y = raw[2]
    return dict(got=mean_loss(got[2], y), want=eaft_loss(z, y, shift=False, weight_norm="mean", mean_weight=mean0).loss,
                own=eaft_loss(z, y, shift=False, weight_norm="mean").loss,  # the micro-batch's own mean
                mean_weight=run.mean_weight, mean0=mean0, first=mean_loss(got[0], raw[0][1]),
                first_own=eaft_loss(*raw[0], shift=False, weight_norm="mean").loss)


@pytest.fixture(scope="module", params=[(1, 1), (2, 2), (2, 1)], ids=["tp1", "tp2", "tp1_dp2"])
def runs(request, tmp_path_factory):
    world, tp = request.param
    workdir = tmp_path_factory.mktemp(f"megatron_w{world}_tp{tp}")
    mp.spawn(_worker, args=(world, tp, str(workdir)), nprocs=world, join=True)
    return world, tp, [torch.load(workdir / f"rank{r}.pt") for r in range(world)]


def test_wrapper_is_installed_by_activate(runs):
    world, tp, results = runs
    for res in results:
        assert any("compute_language_model_loss" in p for p in res["patched"]), res["patched"]
        # ...lazily: only once megatron-core's language module was imported (by building the model).
        assert not any("compute_language_model_loss" in p for p in res["patched_before_model_import"])


def test_eaft_off_leaves_megatron_ce_alone(runs):
    """With EAFT off the wrapper returns Megatron's CE (fused and unfused), i.e. plain CE."""
    world, tp, results = runs
    _, labels = _inputs()
    mask = labels != IGNORE
    for res in results:
        full = res["ref_default_True"]["full_logits"]
        plain = torch.nn.functional.cross_entropy(full.reshape(-1, VOCAB), labels.clamp_min(0).reshape(-1),
                                                  reduction="none").view(BATCH, SEQ)
        for fusion in (True, False):
            torch.testing.assert_close(res[f"megatron_ce_{fusion}"][mask], plain[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["default", "alpha0", "full"])
@pytest.mark.parametrize("fusion", [True, False], ids=["fused_ce", "unfused_ce"])
def test_eaft_matches_core_on_gathered_logits(runs, name, fusion):
    from eaft_plugins.ops.dense import token_scores

    world, tp, results = runs
    _, labels = _inputs()
    mask = labels != IGNORE
    opts = {"default": {}, "alpha0": dict(alpha=0.0), "full": dict(topk=None, gate="hard", h_min=0.3)}[name]
    for res in results:
        got, ref = res[f"eaft_{name}_{fusion}"], res[f"ref_{name}_{fusion}"]
        scores = token_scores(ref["full_logits"], labels, shift=False, **opts)
        expected = torch.zeros(BATCH * SEQ)
        expected[scores.index] = scores.weight * scores.ce
        torch.testing.assert_close(got["per_token"].reshape(-1), expected, rtol=1e-5, atol=1e-6)
        assert torch.all(got["per_token"][~mask] == 0)
        torch.testing.assert_close(got["per_token"].sum() / mask.sum(), ref["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["stats"], ref["stats"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["weight_grad"], ref["weight_grad"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["hidden_grad"], ref["hidden_grad"], rtol=1e-4, atol=1e-6)
        if name == "alpha0":  # weights are all 1: EAFT must reproduce Megatron's own CE kernel
            torch.testing.assert_close(got["per_token"][mask], res[f"megatron_ce_{fusion}"][mask], rtol=1e-5, atol=1e-5)
        if name == "full":  # the hard gate really dropped tokens
            assert 0 < got["stats"][1] < got["stats"][4]


def test_metrics_reduce_over_data_parallel_only(runs):
    world, tp, results = runs
    for res in results:
        stats = res["metrics_stats"].float()
        assert res["dp"] == world // tp
        expected = {"eaft/ce": 0, "eaft/weight": 1, "eaft/entropy": 2, "eaft/conflict_frac": 3}
        for key, i in expected.items():
            torch.testing.assert_close(res["metrics"][key], res["dp"] * torch.stack([stats[i], stats[4]]))


def test_weight_norm_mean_divides_by_the_previous_steps_global_mean(runs):
    """The one rule of every framework (run.py): not each micro-batch's own mean, but the previous optimizer
    step's mean raw weight over all its micro-batches and data-parallel ranks."""
    world, tp, results = runs
    for res in results:
        wn = res["weight_norm"]
        torch.testing.assert_close(wn["first"], wn["first_own"], rtol=1e-5, atol=1e-6)  # no previous step yet
        assert wn["mean_weight"] == pytest.approx(wn["mean0"], rel=1e-6)
        torch.testing.assert_close(wn["got"], wn["want"], rtol=1e-5, atol=1e-6)
        assert abs(float(wn["got"] - wn["own"])) > 1e-3 * float(wn["own"])  # what dividing by its own mean gives


def test_mtp_is_refused(runs):
    world, tp, results = runs
    for res in results:
        assert "multi-token prediction" in (res["mtp_error"] or "")


# ---- arguments: `megatron sft --loss_type eaft --eaft_*` ----------------------------------------


def _args(**kw):
    base = dict(loss_type=None, rlhf_type=None, task_type=None, mtp_num_layers=None, enable_dft_loss=False)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_configure_turns_eaft_on_and_off():
    from eaft_plugins.integrations.swift import megatron as swift_megatron

    config = swift_megatron.configure(_args(loss_type="eaft", eaft_topk="full", eaft_alpha=0.5, eaft_gate="hard"))
    opts = config.options
    assert (opts.topk, opts.alpha, opts.gate) == (None, 0.5, "hard")
    assert swift_megatron.configure(_args(loss_type=None)) is None


def test_the_trainer_run_needs_the_parsed_config():
    """No module state: the trainer builds its run from the parsed arguments, and refuses when they were not parsed."""
    from eaft_plugins.integrations.swift import megatron as swift_megatron

    model = types.SimpleNamespace()
    trainer = types.SimpleNamespace(args=_args(loss_type="eaft"))
    with pytest.raises(RuntimeError, match="did not parse the EAFT settings"):
        swift_megatron.bind(trainer, [model])
    trainer.args.eaft_config = swift_megatron.configure(_args(loss_type="eaft", eaft_topk="7"))
    run = swift_megatron.bind(trainer, [model], group="dp")
    assert model.eaft_run is run and trainer._eaft is run and run.options.topk == 7 and run.group == "dp"
    assert swift_megatron.bind(types.SimpleNamespace(args=_args(loss_type=None)), [model]) is None


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(loss_type="eaft", rlhf_type="dpo"), "not `megatron rlhf`"),
        (dict(loss_type="eaft", task_type="seq_cls"), "needs --task_type causal_lm"),
        (dict(loss_type="eaft", mtp_num_layers=1), "--mtp_num_layers"),
        (dict(loss_type="eaft", enable_dft_loss=True), "--enable_dft_loss"),
        (dict(loss_type=None, eaft_alpha=0.5), "--eaft_alpha set but --loss_type is None"),
        (dict(loss_type="eaft", eaft_gate="sometimes"), "gate must be one of"),
        (dict(loss_type="eaft", eaft_topk="1"), "topk must be an integer >= 2"),
        (dict(loss_type="eaft", eaft_fused="true"), "--eaft_fused is for `swift sft`"),
    ],
)
def test_configure_refuses(kw, message):
    from eaft_plugins.integrations.swift import megatron as swift_megatron

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        swift_megatron.configure(_args(**kw))


def test_topk_above_megatrons_vocabulary_names_the_flag():
    run = _run(topk=100)
    run.check_vocab_size(128)
    with pytest.raises(ValueError, match=r"^--eaft_topk: topk=100 is larger than the vocabulary \(64\)"):
        run.check_vocab_size(64)


def test_megatron_sft_arguments_accept_eaft_flags():
    """The real MegatronSftArguments parser; needs mcore_bridge, which needs transformer_engine (CUDA)."""
    if importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("SKIPPED: ms-swift's Megatron arguments import mcore_bridge, which needs transformer_engine "
                    "(a CUDA build); not installable on this CPU machine")
    from transformers import HfArgumentParser

    from eaft_plugins.integrations.swift import megatron as swift_megatron

    swift_megatron.activate()
    from swift.megatron.arguments import MegatronSftArguments

    parser = HfArgumentParser([MegatronSftArguments])
    ns, rest = parser.parse_known_args(["--loss_type", "eaft", "--eaft_topk", "10", "--eaft_alpha", "0.5"])
    assert rest == [] and (ns.loss_type, ns.eaft_topk, ns.eaft_alpha) == ("eaft", "10", 0.5)
