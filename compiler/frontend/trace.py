"""torch.export the model with dynamic token/batch dimensions, then convert to IR."""

from __future__ import annotations

import logging

import torch
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind

from compiler.frontend import attention
from compiler.frontend.convert import Converter, UnsupportedOpError, convert_node
from compiler.frontend.loader import ModelFacts, UnsupportedModelError
from ir.builder import GraphBuilder
from ir.graph import Graph
from ir.ops import PagedAttention
from ir.verify import verify

log = logging.getLogger(__name__)
RUNTIME_INPUTS = ("token_ids", "positions", "logits_indices")
WRAPPER_PREFIX = "model."


class _Forward(torch.nn.Module):
    """The flat-batch calling convention: tokens [T] and positions [T] -> logits [B, vocab]."""

    def __init__(self, model: torch.nn.Module, hf_forward: bool) -> None:
        super().__init__()
        self.model = model
        self.hf_forward = hf_forward

    def forward(self, token_ids, positions, logits_indices):
        if not self.hf_forward:  # already the flat convention (compiler/frontend/module.py)
            return self.model(token_ids, positions, logits_indices)
        out = self.model(
            input_ids=token_ids[None],
            position_ids=positions[None],
            logits_to_keep=logits_indices,
            use_cache=False,
        )
        return out.logits[0]


def export(model: torch.nn.Module, hf_forward: bool = True) -> ExportedProgram:
    attention.register()
    if hf_forward:
        for config in (model.config, getattr(model.config, "text_config", None)):
            if config is not None:
                config._attn_implementation = attention.ATTN_IMPLEMENTATION
    tokens, seqs = Dim("T", min=2, max=1 << 20), Dim("B", min=2, max=1 << 16)
    device = next(model.parameters()).device
    example = (
        torch.arange(7, device=device) % 2,  # any vocabulary holds tokens 0 and 1
        torch.arange(7, device=device),
        torch.tensor([3, 6], device=device),
    )
    with torch.no_grad():
        return torch.export.export(
            _Forward(model, hf_forward),
            example,
            dynamic_shapes=({0: tokens}, {0: tokens}, {0: seqs}),
            strict=False,
        )


def trace_model(
    model: torch.nn.Module, facts: ModelFacts | None = None
) -> tuple[Graph, dict[str, torch.Tensor]]:
    """Return the model as an IR graph plus its weights, keyed by the graph's param names.

    Without `facts`, `model` is a transformers model.
    """
    hf_forward = facts is None or facts.hf_forward
    arch = facts.model_type if facts else getattr(model.config, "model_type", "model")
    try:
        program = export(model, hf_forward)
        graph, params = to_ir(program)
    except UnsupportedOpError as e:
        raise UnsupportedOpError(f"{arch}: unsupported: {e}") from e
    _check_graph(arch, graph)
    log.info("traced %s: %d nodes, %d params", arch, len(graph.nodes), len(params))
    return verify(graph, after="trace"), params


def _check_graph(arch: str, graph: Graph) -> None:
    """Logits [B, vocab] (the rows `logits_indices` picks: one per sampled sequence, then any
    scored prompt token) and one attention op per layer, numbered 0..L-1, of one KV shape:
    the cache holds a slab each."""
    logits = graph.type_of(graph.outputs[0])
    if logits.rank != 2 or logits.shape[0] != "B":
        raise UnsupportedModelError(
            f"{arch}: returns {logits}; the logits must be [B, vocab], the rows logits_indices "
            "picks (one per sequence to sample), not one per token"
        )
    attention = [n.op for n in graph.nodes if isinstance(n.op, PagedAttention)]
    if len({(a.num_kv_heads, a.head_dim) for a in attention}) > 1:
        raise UnsupportedModelError(f"{arch}: layers with different KV heads or head_dim")
    layers = sorted(a.layer for a in attention)
    if not layers:
        raise UnsupportedModelError(
            f"{arch}: no attention traced (a custom module calls kiln.attention in each layer)"
        )
    if layers != list(range(len(layers))):
        raise UnsupportedModelError(
            f"{arch}: attention layer numbers must be 0..{len(layers) - 1}, each once; got {layers}"
        )


def to_ir(program: ExportedProgram) -> tuple[Graph, dict[str, torch.Tensor]]:
    fx_graph = program.graph_module.graph
    placeholders = [n for n in fx_graph.nodes if n.op == "placeholder"]
    user = [n for n in placeholders if n.name in _user_input_names(program)]
    symbols = {
        str(user[0].meta["val"].shape[0].node.expr): "T",
        str(user[2].meta["val"].shape[0].node.expr): "B",
    }
    cx = Converter(GraphBuilder(), symbols)
    params = _bind_inputs(cx, program, placeholders, user)
    output = next(n for n in fx_graph.nodes if n.op == "output")
    live = _live_nodes(output)
    for node in fx_graph.nodes:
        if node.op == "call_function" and node in live:
            convert_node(cx, node)
    if len(output.args[0]) != 1:
        raise UnsupportedOpError(f"{len(output.args[0])} outputs; the logits [B, vocab] only")
    (result,) = output.args[0]
    return cx.builder.build((cx.env[result],)), {**params, **cx.constants}


def _user_input_names(program: ExportedProgram) -> list[str]:
    return [
        s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT
    ]


def _bind_inputs(cx, program, placeholders, user) -> dict[str, torch.Tensor]:
    for node, name in zip(user, RUNTIME_INPUTS, strict=True):
        cx.env[node] = cx.builder.input(name, cx.type_of(node))
    specs = {s.arg.name: s for s in program.graph_signature.input_specs}
    tensors = {**program.state_dict, **program.constants}
    params: dict[str, torch.Tensor] = {}
    for node in placeholders:
        if node in cx.env:
            continue
        target = specs[node.name].target
        name = target.removeprefix(WRAPPER_PREFIX)
        params[name] = tensors[target].detach()
        cx.env[node] = cx.builder.input(name, cx.type_of(node), kind="param")
    return params


def _live_nodes(output) -> set:
    live, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        stack.extend(node.all_input_nodes)
    return live
