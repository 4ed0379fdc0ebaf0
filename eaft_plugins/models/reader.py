"""Which Hugging Face causal LMs fused EAFT can run, read from each family's own forward.

Any decoder-only `*ForCausalLM` whose logits are a function of `lm_head(last hidden state)` that the op
can reproduce. That is read from the family's forward (its source, parsed once per class): the
statements after the LM head call may only apply a known logit transform (`LogitTransform`: Cohere's
`logits * logit_scale`, Granite's `logits / logits_scaling`, Gemma's `final_logit_softcapping`, ...;
`if` tests on the config are evaluated for this model), compute the causal LM loss with
`self.loss_function`, and add a MoE router loss `coef * aux_loss`. Anything else (a z-loss, a
vocabulary slice, a learned soft-cap module, a loss of its own) is refused with a ValueError quoting
the statement, and `DENIED` names families known not to fit: never a silent dense fall-back, never a
wrong loss. `describe_model(model)` tells what was found; `models/patch.py` runs the plan.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..ops.fused import LogitTransform

# Families whose forward the op could be made to run but whose training objective is not
# next-token prediction from one LM head over a text decoder.
DENIED = {
    "Gemma4AssistantForCausalLM": "a draft (assistant) model that projects another model's hidden states",
    "Gemma4UnifiedAssistantForCausalLM": "a draft (assistant) model that projects another model's hidden states",
    "ProphetNetForCausalLM": "n-gram (multi-token) prediction streams share its LM head",
    "MusicgenForCausalLM": "one LM head per audio codebook",
    "MusicgenMelodyForCausalLM": "one LM head per audio codebook",
    "CsmDepthDecoderForCausalLM": "codebook heads indexed by position",
    "MoshiForCausalLM": "a speech-text model whose loss is computed on its own terms",
    "GitForCausalLM": "an image-text model whose loss skips the image tokens",
    "xLSTMForCausalLM": "its logits are soft-capped chunk by chunk only in evaluation",
}
# Encoder-decoder halves: cross-attention on an encoder's states, and a loss without the causal shift.
for _name in ("Bart", "BigBirdPegasus", "Blenderbot", "BlenderbotSmall", "Marian", "MBart", "Pegasus", "PLBart",
              "Mvp", "TrOCR", "Whisper"):
    DENIED[f"{_name}ForCausalLM"] = "the decoder of an encoder-decoder model (its own loss does not shift the labels)"
DENIED_SUFFIXES = {
    "ForConditionalGeneration": "a multimodal or encoder-decoder model (its forward merges other inputs and often "
                                "computes its own loss); fused EAFT covers text decoders (*ForCausalLM)",
}

TANH = ("torch.tanh", "nn.functional.tanh", "torch.nn.functional.tanh", "F.tanh")
PASS_THROUGH = ("float", "contiguous")  # methods on the logits that do not change their values for the op
# What the family's forward may read of its LM head besides calling it, e.g. Mamba's
# `self.lm_head(hidden.to(self.lm_head.weight.dtype))`: the stub that stands in for the head while the forward
# runs (models/patch.py) answers these from the real head; any other read is refused when patching.
HEAD_ATTRS = ("weight", "bias", "in_features", "out_features")


class Unsupported(ValueError):
    pass


@dataclass
class FamilyPlan:
    """What one model's forward does after its decoder, as fused EAFT reproduces it."""

    family: str
    head: str  # attribute called as the LM head
    transform: LogitTransform
    aux_coef: Optional[str]  # source of the router loss coefficient (`self.router_aux_loss_coef`); None: no aux loss
    forward: Callable  # the family's own forward function (unbound)


def describe_model(model: nn.Module) -> FamilyPlan:
    """The fused-EAFT plan of `model` (PEFT / DDP wrappers are looked through); ValueError naming what does not fit."""
    lm = causal_lm_of(model)
    name = type(lm).__name__
    if name in DENIED:
        raise Unsupported(f"fused EAFT does not support {name}: {DENIED[name]}")
    for suffix, why in DENIED_SUFFIXES.items():
        if name.endswith(suffix):
            raise Unsupported(f"fused EAFT does not support {name}: {why}")
    return _Reader(lm).plan()


def router_aux_coef(model: nn.Module) -> Optional[float]:
    """The coefficient `model`'s own forward multiplies its MoE `aux_loss` by, read now (frameworks set it
    late), None when the forward adds none. ValueError when it adds one in a way this module cannot read."""
    lm = causal_lm_of(model)
    _, _, coef, module_globals = _forward_source(type(lm))
    if coef is None:
        return None
    value = eval(compile(ast.Expression(coef), "<router aux coef>", "eval"), module_globals, {"self": lm})  # noqa: S307
    if isinstance(value, torch.Tensor):
        value = value.item()
    return float(value)


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The causal LM inside PEFT / DDP / DeepSpeed wrappers."""
    seen = model
    for _ in range(8):
        if hasattr(seen, "get_base_model"):  # peft.PeftModel
            seen = seen.get_base_model()
        elif isinstance(getattr(seen, "module", None), nn.Module):  # DDP, DeepSpeedEngine
            seen = seen.module
        else:
            break
    return seen


# ---- reading the family's forward


@functools.lru_cache(maxsize=None)
def _forward_source(cls):
    """(forward FunctionDef, compiled forward function or None, router aux coefficient expr or None, globals)
    of the first class in cls's MRO whose source defines forward."""
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or "forward" not in klass.__dict__:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError) as exc:
            raise Unsupported(f"fused EAFT reads {cls.__name__}'s forward from its source, which is unavailable ({exc})")
        tree = ast.parse(source)
        defs = [n for n in tree.body[0].body if isinstance(n, ast.FunctionDef) and n.name == "forward"]
        if not defs:  # forward assigned at class level, e.g. `forward = Other.forward`
            raise Unsupported(f"fused EAFT cannot read {cls.__name__}'s forward (not defined in {klass.__name__}'s source)")
        fn_def = defs[0]
        module_globals = inspect.getmodule(klass).__dict__
        return fn_def, _compile_forward(fn_def, klass, module_globals), _aux_coef_expr(fn_def), module_globals
    raise Unsupported(f"fused EAFT found no forward in {cls.__name__}'s classes")


def _compile_forward(fn_def: ast.FunctionDef, klass, module_globals):
    """The forward as its source defines it (a class attribute patched since, e.g. by Liger, is not used)."""
    filename = inspect.getsourcefile(klass) or "<forward>"
    first_line = inspect.getsourcelines(klass)[1]
    # Inside a function taking __class__, so zero-argument super() works as in the class body.
    maker = ast.FunctionDef(name="_make", args=ast.arguments(posonlyargs=[], args=[ast.arg("__class__")], vararg=None,
                                                             kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[]),
                            body=[fn_def, ast.Return(ast.Name("forward", ast.Load()))], decorator_list=[], returns=None)
    module = ast.fix_missing_locations(ast.Module(body=[maker], type_ignores=[]))
    ast.increment_lineno(module, first_line - 1)
    scope = {}
    exec(compile(module, filename, "exec"), module_globals, scope)  # noqa: S102  (the family's own source)
    return scope["_make"](klass)


def _aux_coef_expr(fn_def: ast.FunctionDef):
    """`coef` of the forward's `loss += coef * aux_loss...` (or `loss = loss + ...`), None when there is none."""
    found = []
    for node in ast.walk(fn_def):
        value = None
        if isinstance(node, ast.AugAssign) and _is_name(node.target, "loss") and isinstance(node.op, ast.Add):
            value = node.value
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1 and _is_name(node.targets[0], "loss")
              and isinstance(node.value, ast.BinOp) and isinstance(node.value.op, ast.Add)
              and _is_name(node.value.left, "loss")):
            value = node.value.right
        if value is not None and _mentions(value, "aux_loss"):
            if not (isinstance(value, ast.BinOp) and isinstance(value.op, ast.Mult) and _mentions(value.right, "aux_loss")
                    and not _mentions(value.left, "aux_loss")):
                raise Unsupported(f"fused EAFT cannot read how the forward adds its router loss: `{ast.unparse(node)}`")
            found.append(value.left)
    if len(found) > 1:
        raise Unsupported("fused EAFT found the router loss added more than once in the forward")
    return found[0] if found else None


def _targets(stmt) -> list:
    return stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]


def _is_name(node, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _mentions(node, name: str) -> bool:
    return any(_is_name(n, name) for n in ast.walk(node))


def _is_self_attr(node, name: Optional[str] = None) -> bool:
    return (isinstance(node, ast.Attribute) and _is_name(node.value, "self")
            and (name is None or node.attr == name))


def _head_name(lm: nn.Module) -> Optional[str]:
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    for name, child in lm.named_children():
        if child is head and head is not None:
            return name
    return None


class _Reader:
    """Reads one model's forward after its LM head call, evaluating config-dependent `if`s for this model."""

    def __init__(self, lm: nn.Module):
        self.lm = lm
        self.family = type(lm).__name__
        self.fn_def, self.forward, self.aux_coef, self.globals = _forward_source(type(lm))
        self.env = {}
        self.ops = []
        self.logits = self.head = None

    def refuse(self, what: str, node=None) -> Unsupported:
        shown = f": `{ast.unparse(node)}`" if node is not None else ""
        return Unsupported(f"fused EAFT cannot reproduce {self.family}'s forward: {what}{shown}")

    def plan(self) -> FamilyPlan:
        head = _head_name(self.lm)
        if head is None:
            raise self.refuse("its output embeddings (get_output_embeddings) are not a direct child module to fuse")
        body = [s for s in self.fn_def.body
                if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str))]
        calls = [n for n in ast.walk(self.fn_def) if isinstance(n, ast.Call) and _is_self_attr(n.func, head)]
        if len(calls) != 1:
            raise self.refuse(f"it calls its LM head `self.{head}` {len(calls)} times (fused EAFT needs exactly one call)")
        self.check_head_reads(head)
        at = next(i for i, s in enumerate(body) if any(n is calls[0] for n in ast.walk(s)))
        for stmt in body[:at]:
            if _mentions(stmt, "labels"):
                raise self.refuse("it uses the labels before its LM head", stmt)
        stmt = body[at]
        if not (isinstance(stmt, (ast.Assign, ast.AnnAssign)) and len(_targets(stmt)) == 1
                and isinstance(_targets(stmt)[0], ast.Name)):
            raise self.refuse("its LM head call is not a plain assignment", stmt)
        self.logits = _targets(stmt)[0].id
        self.head = head
        self.ops = self.logit_ops(stmt.value)
        self.walk(body[at + 1:])
        if self.aux_coef is not None:
            try:
                self.const(self.aux_coef)
            except Unsupported as exc:
                raise self.refuse(f"its router loss coefficient cannot be read ({exc})", self.aux_coef) from None
        return FamilyPlan(self.family, head, self.transform(), None if self.aux_coef is None else ast.unparse(self.aux_coef),
                          self.forward)

    def check_head_reads(self, head: str) -> None:
        """Besides its one call, the forward may only read HEAD_ATTRS of its head (the stub answers those)."""
        parents = {child: node for node in ast.walk(self.fn_def) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(self.fn_def):
            if not _is_self_attr(node, head):
                continue
            parent = parents[node]
            called = isinstance(parent, ast.Call) and parent.func is node
            if not (called or isinstance(parent, ast.Attribute) and parent.attr in HEAD_ATTRS):
                raise self.refuse(f"it reads its LM head `self.{head}` other than by calling it or reading "
                                  f"{', '.join(HEAD_ATTRS)}", parent)

    # -- expressions

    def const(self, node):
        """What the expression gives for this model (config values); Unsupported if it depends on inputs."""
        if _mentions(node, self.logits) or _mentions(node, "labels"):
            raise self.refuse("a value depends on the logits or labels", node)
        try:
            value = eval(compile(ast.Expression(node), "<forward>", "eval"), self.globals, {"self": self.lm, **self.env})  # noqa: S307
        except Exception as exc:
            raise self.refuse(f"cannot evaluate a condition or constant ({type(exc).__name__}: {exc})", node) from None
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.requires_grad:
                raise self.refuse("the logits are transformed by a tensor that is not a fixed scalar (a learned "
                                  "parameter?)", node)
            value = value.item()
        return value

    def number(self, node) -> float:
        value = self.const(node)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.refuse(f"the logits are transformed by a non-number ({type(value).__name__})", node)
        return float(value)

    def logit_ops(self, node) -> list:
        """The chain of (op, constant) the expression applies to the logits (or to the head's output)."""
        if _is_name(node, self.logits):
            return list(self.ops)
        if isinstance(node, ast.Call) and _is_self_attr(node.func, self.head):
            return []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and not self.is_logits(node.right):
            return self.logit_ops(node.left) + [("div", self.number(node.right))]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            logits, factor = (node.left, node.right) if self.is_logits(node.left) else (node.right, node.left)
            return self.logit_ops(logits) + [("mul", self.number(factor))]
        if isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords and ast.unparse(node.func) in TANH:
            return self.logit_ops(node.args[0]) + [("tanh", None)]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.args and not node.keywords
                and node.func.attr in PASS_THROUGH + ("tanh",)):
            return self.logit_ops(node.func.value) + ([("tanh", None)] if node.func.attr == "tanh" else [])
        raise self.refuse("it applies something to the logits that fused EAFT does not implement", node)

    def is_logits(self, node) -> bool:
        return _mentions(node, self.logits) or any(isinstance(n, ast.Call) and _is_self_attr(n.func, self.head)
                                                   for n in ast.walk(node))

    def transform(self) -> LogitTransform:
        ops = self.ops
        kinds = [op for op, _ in ops]
        if not ops:
            return LogitTransform()
        if kinds == ["mul"]:
            return LogitTransform("scale", ops[0][1])
        if kinds == ["div"]:
            return LogitTransform("divide", ops[0][1])
        if kinds == ["div", "tanh", "mul"] and ops[0][1] == ops[2][1]:
            return LogitTransform("softcap", ops[0][1])
        raise Unsupported(f"fused EAFT cannot reproduce {self.family}'s logit transform {ops}: it implements "
                          f"{', '.join(LogitTransform.KINDS)}")

    # -- statements after the head

    def walk(self, stmts) -> None:
        for stmt in stmts:
            if isinstance(stmt, ast.Return):
                return
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                targets = _targets(stmt)
                if len(targets) != 1 or not isinstance(targets[0], ast.Name):
                    raise self.refuse("it assigns after its LM head in a way fused EAFT cannot read", stmt)
                name = targets[0].id
                if name == self.logits:
                    self.ops = self.logit_ops(stmt.value)
                elif name in ("loss", "aux_loss") and isinstance(stmt.value, ast.Constant) and stmt.value.value is None:
                    pass
                else:
                    self.env[name] = self.const(stmt.value)
            elif isinstance(stmt, ast.If):
                self.branch(stmt)
            else:
                raise self.refuse("it does something after its LM head that fused EAFT cannot reproduce", stmt)

    def branch(self, stmt: ast.If) -> None:
        test = ast.unparse(stmt.test)
        if test == "labels is not None":
            if stmt.orelse:
                raise self.refuse("it does something without labels", stmt)
            self.loss_block(stmt.body)
        elif test == "output_router_logits":
            self.aux_block(stmt.body)
        elif test == "not return_dict":
            pass  # the patched forward refuses tuple outputs when it runs
        else:
            self.walk(stmt.body if self.const(stmt.test) else stmt.orelse)

    def loss_block(self, stmts) -> None:
        """Under `if labels is not None`: the causal LM loss (replaced by EAFT), nothing added to it."""
        for stmt in stmts:
            if (isinstance(stmt, ast.Assign) and _is_name(stmt.targets[0], "loss") and isinstance(stmt.value, ast.Call)
                    and _is_self_attr(stmt.value.func, "loss_function")):
                continue
            if isinstance(stmt, ast.Assign) and _is_name(stmt.targets[0], "labels"):
                continue
            if isinstance(stmt, ast.If) and not _mentions(stmt.test, self.logits) and not _mentions(stmt.test, "labels"):
                self.loss_block(stmt.body if self.const(stmt.test) else stmt.orelse)
                continue
            raise self.refuse("its loss is not only the causal LM loss (self.loss_function)", stmt)

    def aux_block(self, stmts) -> None:
        """Under `if output_router_logits`: aux_loss computed by the family, then `loss += coef * aux_loss`."""
        for stmt in stmts:
            if isinstance(stmt, ast.Assign) and _is_name(stmt.targets[0], "aux_loss"):
                continue
            if (isinstance(stmt, ast.If) and ast.unparse(stmt.test) == "labels is not None" and len(stmt.body) == 1
                    and not stmt.orelse and self.aux_coef is not None):
                continue  # the `loss += coef * aux_loss` that _aux_coef_expr read
            raise self.refuse("its router loss block does something fused EAFT cannot reproduce", stmt)
