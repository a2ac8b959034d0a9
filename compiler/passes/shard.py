"""Tensor-parallel sharding (Megatron-style): one graph for every rank, weights per rank.

Runs after the pipeline (merged projections, folded params): (graph, params, tp) ->
(graph, [params of rank 0, ..., rank tp-1]), pure. Linears are recognized by what they
connect to, never by weight names:

- column-parallel: a Linear over a replicated input whose output only feeds Slices of its
  last dim (merged q/k/v, merged gate/up). Each slice is a segment split evenly over the
  ranks: rank r's weight (and bias) is the concat of the r-th part of every segment, and
  the slice offsets shrink to match. Any other Linear over a replicated input but the LM head
  is column-parallel as one segment (a per-head fused q/k/v, a lone up-projection) whose
  split last dim its users must take.
- KV heads fewer than the ranks (MQA, or GQA at a large tp) are replicated, as vLLM does:
  a k or v segment (one that reaches an attention op's k/v through reshapes, norms and
  ropes) is cut into num_kv_heads parts, rank r holding part r * num_kv_heads // tp, so
  each rank attends with one KV head that its query heads share.
- split values then flow through Reshapes that split their leading split dim (heads),
  RMSNorm over an unsplit last dim (q/k norms), Slices and Concats along another dim than
  the split one and Ropes whose replicated tables broadcast over it (partial rotary),
  PagedAttention (num_heads and num_kv_heads divided) and elementwise ops over equally
  split operands (SiluMul).
- row-parallel: a Linear over a split input (o_proj, down): its weight's columns are
  split, and a new AllReduce sums the partial outputs; a bias is added after the sum
  (once, not on every rank's partial output).
- QuantLinears (a pre-quantized checkpoint's) shard as Linears: column-parallel cuts the
  rows of qweight, scales, zeros and bias alike; row-parallel cuts the columns of qweight
  and of the per-group scales and zeros (whole groups per rank; fp8's per-row scales are
  replicated).
- replicated: everything over replicated values. The embedding and the LM head (a Linear
  whose output only reaches graph outputs through reshapes, casts and elementwise ops of the
  logits alone, such as a softcap) are kept whole on every rank: no logits all-gather, and
  the LM head runs on the last tokens only.

Anything else is refused with ShardError: heads not divisible by tp, KV heads neither
divisible by tp nor dividing it, other
uses of a split value, a Linear that fits none of the patterns, a cut weight shared with
another node.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ir import ops
from ir.builder import GraphBuilder
from ir.graph import Graph, Input, Node, Value
from ir.ops import Op
from ir.types import TensorType, normalize_dim
from ir.verify import verify

ELEMENTWISE = (ops.SiluMul, ops.FusedElementwise, ops.Unary, ops.Binary, ops.BinaryScalar, ops.Cast)
# what may sit between the LM head and the graph output: views, and elementwise ops of the
# logits and weights alone (a logit softcap)
HEAD_TAIL = (ops.Reshape, *ELEMENTWISE)
PROJECTIONS = (ops.Linear, ops.QuantLinear)


class ShardError(ValueError):
    pass


def _chunk(rank: int, parts: int, tp: int) -> int:
    """Which of `parts` equal chunks rank r holds: its own when parts == tp, else (parts
    dividing tp: replicated KV heads) one shared by tp // parts consecutive ranks."""
    return rank * parts // tp


@dataclass(frozen=True, slots=True)
class Split:
    """`axis` is cut into `parts` equal contiguous chunks; rank r holds _chunk(r, parts, tp)."""

    axis: int
    parts: int


@dataclass(frozen=True, slots=True)
class Segments:
    """A column-parallel output: [start, end) segments, each cut into its own number of parts
    (tp, or num_kv_heads for a replicated k or v); rank r holds its chunk of every one."""

    bounds: tuple[tuple[int, int], ...]
    parts: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Cut:
    """How a weight is divided: each [start, end) segment of `dim` as Segments says."""

    dim: int
    bounds: tuple[tuple[int, int], ...]
    parts: tuple[int, ...]

    def part(self, t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        pieces = [
            t.narrow(self.dim, s + _chunk(rank, p, tp) * (e - s) // p, (e - s) // p)
            for (s, e), p in zip(self.bounds, self.parts, strict=True)
        ]
        return torch.cat(pieces, self.dim).contiguous()

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        out = list(shape)
        out[self.dim] = sum((e - s) // p for (s, e), p in zip(self.bounds, self.parts, strict=True))
        return tuple(out)


Layout = Split | Segments


class _Planner:
    """Walks the graph once, deciding each node's per-rank op and each weight's cut."""

    def __init__(self, graph: Graph, tp: int) -> None:
        self.graph, self.tp = graph, tp
        self.users = graph.users()
        self.params = {i.value.name for i in graph.params}
        self.layouts: dict[str, Layout] = {}
        self.cuts: dict[str, Cut] = {}
        self.new_ops: dict[int, Op] = {}  # node id -> its per-rank op, where that differs
        self.row_parallel: set[int] = set()  # node ids of Linears followed by an AllReduce

    def run(self) -> None:
        for node in self.graph.nodes:
            layouts = [self.layouts.get(n) if n else None for n in node.inputs]
            if any(layouts):
                self._split_node(node, layouts)
            elif isinstance(node.op, PROJECTIONS):
                self._replicated_linear(node)
        for name in self.graph.outputs:
            if name in self.layouts:
                raise ShardError(f"graph output %{name} would be split over the ranks")

    def fail(self, node: Node, why: str) -> ShardError:
        outs = ", ".join(f"%{v.name}" for v in node.outputs)
        return ShardError(f"cannot shard {type(node.op).__name__} -> {outs}: {why}")

    def type_of(self, name: str) -> TensorType:
        return self.graph.type_of(name)

    def _replicated_linear(self, node: Node) -> None:
        weights, bias = _operands(node)
        rows = [*weights, *([bias] if bias else [])]  # all cut along the outputs
        slices = self.users.get(node.outputs[0].name, [])
        last = self.type_of(node.outputs[0].name).rank - 1
        if slices and all(_is_slice(u, last) for u in slices):
            segments = self._column_parallel(node, rows, slices)
            self.layouts[node.outputs[0].name] = segments
        elif slices and not self._reaches_outputs_only(node.outputs[0].name):
            # one segment (GPT-NeoX's per-head [q|k|v] projection, a lone up-projection): its
            # users' rules decide whether a split last dim can flow on
            segment = self._column_parallel(node, rows, [])
            (parts,) = segment.parts  # a lone k or v: kv heads
            self.layouts[node.outputs[0].name] = Split(last, parts)

    def _reaches_outputs_only(self, name: str) -> bool:
        users = self.users.get(name, [])
        if name in self.graph.outputs:
            return not users
        return bool(users) and all(
            isinstance(u.op, HEAD_TAIL)
            and set(u.inputs) - {name, None} <= self.params
            and self._reaches_outputs_only(u.outputs[0].name)
            for u in users
        )

    def _column_parallel(self, node: Node, rows: list[str], slices: list[Node]) -> Segments:
        """Cuts the params `rows` (weight, bias) into the segments that `slices` take (one
        segment without slices) and returns the output's layout."""
        width = self.type_of(node.outputs[0].name).shape[-1]
        parts_of = {_bounds(u.op, width): self._parts(u) for u in slices}
        bounds = tuple(sorted(parts_of)) or ((0, width),)
        if [s for s, _ in bounds] != [0, *(e for _, e in bounds[:-1])] or bounds[-1][1] != width:
            raise self.fail(node, f"its slices {bounds} do not tile its {width} outputs")
        parts = tuple(parts_of.get(b, self.tp) for b in bounds) if slices else (self._parts(node),)
        for (s, e), p in zip(bounds, parts, strict=True):
            if (e - s) % p:
                raise self.fail(node, f"segment [{s}, {e}) is not divisible into {p} parts")
        for param in rows:
            self._cut(node, param, Cut(0, bounds, parts))
        return Segments(bounds, parts)

    def _parts(self, node: Node) -> int:
        """num_kv_heads where `node` is a k or v that reaches attention with fewer KV heads than
        ranks (through reshapes, norms and ropes, each its only user), else tp."""
        while True:
            users = self.users.get(node.outputs[0].name, [])
            if len(users) != 1:
                return self.tp
            name, (node,) = node.outputs[0].name, users
            if isinstance(node.op, ops.PagedAttention):
                kv = node.op.num_kv_heads
                return kv if name in node.inputs[1:3] and kv < self.tp else self.tp
            if not isinstance(node.op, ops.Reshape | ops.RMSNorm | ops.Rope | ops.Cast):
                return self.tp

    def _cut(self, node: Node, param: str, cut: Cut) -> None:
        if param not in self.params or len(self.users[param]) != 1:
            raise self.fail(node, f"%{param} is not a weight used by this node alone")
        self.cuts[param] = cut

    def _split_node(self, node: Node, layouts: list[Layout | None]) -> None:
        rule = SPLIT_RULES.get(type(node.op))
        if rule is None:
            raise self.fail(node, "this op cannot take a tensor-parallel split operand")
        result = rule(self, node, layouts)
        if result is not None:
            self.layouts[node.outputs[0].name] = result


def _is_slice(node: Node, last: int) -> bool:
    op = node.op
    return isinstance(op, ops.Slice) and normalize_dim(op.dim, last + 1) == last and op.step == 1


def _bounds(op: ops.Slice, width: int) -> tuple[int, int]:
    start, end, _ = slice(op.start, op.end).indices(width)
    return start, end


def _slice(pl: _Planner, node: Node, layouts) -> Layout:
    (seg,) = layouts
    if isinstance(seg, Split):
        return _along_other_dim(pl, node, seg)
    widths = [(e - s) // p for (s, e), p in zip(seg.bounds, seg.parts, strict=True)]
    i = seg.bounds.index(_bounds(node.op, pl.type_of(node.inputs[0]).shape[-1]))
    start, end = sum(widths[:i]), sum(widths[: i + 1])
    pl.new_ops[id(node)] = replace(node.op, start=start, end=end)
    return Split(pl.type_of(node.outputs[0].name).rank - 1, seg.parts[i])


def _reshape(pl: _Planner, node: Node, layouts) -> Layout:
    (split,) = layouts
    src, dst = pl.type_of(node.inputs[0]).shape, pl.type_of(node.outputs[0].name).shape
    a = _axis(pl, node, split)
    # the split dim keeps what precedes it, up to unit dims ([T, 16] -> [1, T, 2, 8]); one
    # part (a lone KV head, replicated) may be a unit dim itself ([T, 8] -> [1, T, 1, 8])
    lead = [d for d in src[:a] if d != 1]
    b = next(
        (
            b
            for b in range(len(dst))
            if (dst[b] != 1 or split.parts == 1) and [d for d in dst[:b] if d != 1] == lead
        ),
        None,
    )
    if b is None or not isinstance(dst[b], int):
        raise pl.fail(node, f"the reshape {src} -> {dst} moves the split dimension {a}")
    if dst[b] % split.parts:
        raise pl.fail(node, f"dimension {b} of {dst} is not divisible into {split.parts} parts")
    shape = (*dst[:b], dst[b] // split.parts, *dst[b + 1 :])
    pl.new_ops[id(node)] = replace(node.op, shape=shape)
    return Split(b, split.parts)


def _rmsnorm(pl: _Planner, node: Node, layouts) -> Layout:
    split = layouts[0]
    a = _axis(pl, node, split)
    if a == pl.type_of(node.inputs[0]).rank - 1 or layouts[1] is not None:
        raise pl.fail(node, "normalizing over the split dimension")
    return split


def _along_other_dim(pl: _Planner, node: Node, split: Split) -> Layout:
    """A Slice or Concat along a dim that is not split: each rank's part, unchanged."""
    if normalize_dim(node.op.dim, pl.type_of(node.outputs[0].name).rank) == split.axis:
        raise pl.fail(node, f"slicing or concatenating along the split dimension {split.axis}")
    return split


def _concat(pl: _Planner, node: Node, layouts) -> Layout:
    if len(set(layouts)) != 1:
        raise pl.fail(node, "mixing split and replicated operands")
    return _along_other_dim(pl, node, _split_of(pl, node, layouts[0]))


def _rope(pl: _Planner, node: Node, layouts) -> Layout:
    split = _split_of(pl, node, layouts[0])
    rank = pl.type_of(node.inputs[0]).rank
    for table, layout in zip(node.inputs[1:], layouts[1:], strict=True):
        shape = pl.type_of(table).shape
        axis = split.axis - (rank - len(shape))  # the split dim, aligned as broadcasting does
        if layout is not None or (axis >= 0 and shape[axis] != 1):
            raise pl.fail(node, "its cos/sin tables are not replicated over the split dimension")
    return split


def _attention(pl: _Planner, node: Node, layouts) -> Layout:
    op = node.op
    head_axis = 1 if op.layout == "bhtd" else 2
    kv = Split(head_axis, min(op.num_kv_heads, pl.tp))  # fewer KV heads: replicated
    if layouts[:3] != [Split(head_axis, pl.tp), kv, kv] or any(layouts[3:]):
        raise pl.fail(node, "q, k and v must all be split over heads, cos/sin replicated")
    pl.new_ops[id(node)] = replace(
        op, num_heads=op.num_heads // pl.tp, num_kv_heads=op.num_kv_heads // kv.parts
    )
    return Split(2, pl.tp)  # the output is [1, T, H, D] in both layouts


def _elementwise(pl: _Planner, node: Node, layouts) -> Layout:
    shapes = {pl.type_of(n).shape for n in node.inputs}
    if len(set(layouts)) != 1 or len(shapes) != 1:
        raise pl.fail(node, "mixing split and replicated operands")
    _axis(pl, node, layouts[0])
    return layouts[0]


def _row_parallel(pl: _Planner, node: Node, layouts) -> None:
    x = node.inputs[0]
    if layouts[0] != Split(pl.type_of(x).rank - 1, pl.tp) or any(layouts[1:]):
        raise pl.fail(node, "its input is not split over its last dimension")
    for w in _operands(node)[0]:
        shape = pl.type_of(w).shape
        if len(shape) == 1:
            continue  # fp8's per-row scales: each rank's partial sum takes them whole
        if shape[1] % pl.tp:  # an int4 projection's groups, whole on each rank
            raise pl.fail(node, f"the {shape[1]} columns of %{w} do not split into {pl.tp}")
        pl._cut(node, w, Cut(1, ((0, shape[1]),), (pl.tp,)))
    pl.row_parallel.add(id(node))


def _operands(node: Node) -> tuple[list[str], str | None]:
    """A projection's weights (Linear: w; QuantLinear: qweight, scales[, zeros]), its bias."""
    n = 1 if isinstance(node.op, ops.Linear) else 3 if node.op.format == "int4" else 2
    return list(node.inputs[1 : 1 + n]), next((b for b in node.inputs[1 + n :] if b), None)


def _axis(pl: _Planner, node: Node, layout: Layout | None) -> int:
    return _split_of(pl, node, layout).axis


def _split_of(pl: _Planner, node: Node, layout: Layout | None) -> Split:
    if not isinstance(layout, Split):
        raise pl.fail(node, "a column-parallel output must be sliced first")
    return layout


SPLIT_RULES = {
    ops.Slice: _slice,
    ops.Reshape: _reshape,
    ops.RMSNorm: _rmsnorm,
    ops.Concat: _concat,
    ops.Rope: _rope,
    ops.PagedAttention: _attention,
    ops.Linear: _row_parallel,
    ops.QuantLinear: _row_parallel,
    **{t: _elementwise for t in ELEMENTWISE},
}


def shard(
    graph: Graph, params: dict[str, torch.Tensor], tp: int
) -> tuple[Graph, list[dict[str, torch.Tensor]]]:
    """The per-rank graph (identical on every rank) and each rank's weights."""
    if tp < 1:
        raise ShardError(f"tensor_parallel_size must be at least 1, got {tp}")
    _check_heads(graph, tp)
    planner = _Planner(graph, tp)
    planner.run()
    sharded = verify(_rebuild(planner), after="shard")
    weights = [
        {
            p.value.name: _rank_part(params[p.value.name], planner.cuts.get(p.value.name), r, tp)
            for p in sharded.params
        }
        for r in range(tp)
    ]
    return sharded, weights


def _check_heads(graph: Graph, tp: int) -> None:
    for op in (n.op for n in graph.nodes if isinstance(n.op, ops.PagedAttention)):
        where = f"attention layer {op.layer}"
        if op.num_heads % tp:
            raise ShardError(
                f"{where}: num_heads={op.num_heads} is not divisible by tensor_parallel_size={tp}"
            )
        if op.num_kv_heads % tp and tp % op.num_kv_heads:
            raise ShardError(
                f"{where}: num_kv_heads={op.num_kv_heads} neither is divisible by nor divides "
                f"tensor_parallel_size={tp} (KV heads are split, or replicated when fewer)"
            )


def _rank_part(t: torch.Tensor, cut: Cut | None, rank: int, tp: int) -> torch.Tensor:
    return t if cut is None else cut.part(t, rank, tp)


def _rebuild(pl: _Planner) -> Graph:
    graph = pl.graph
    inputs = tuple(_cut_input(i, pl.cuts.get(i.value.name)) for i in graph.inputs)
    b = GraphBuilder(inputs, taken={v.name for n in graph.nodes for v in n.outputs})
    for node in graph.nodes:
        op = pl.new_ops.get(id(node), node.op)
        names = tuple(v.name for v in node.outputs)
        if id(node) in pl.row_parallel:
            weights, bias = _operands(node)
            partial = b.add1(op, node.inputs[0], *weights, name=b.fresh(f"{names[0]}_partial"))
            if bias is not None:
                total = b.add1(ops.AllReduce(), partial, name=b.fresh(f"{names[0]}_sum"))
                b.add1(ops.Binary("add"), total, bias, name=names[0])
            else:
                b.add1(ops.AllReduce(), partial, name=names[0])
        else:
            b.add(op, *node.inputs, names=names)  # types re-inferred from the cut weights
    return b.build(graph.outputs)


def _cut_input(inp: Input, cut: Cut | None) -> Input:
    if cut is None:
        return inp
    t = inp.value.type
    return Input(Value(inp.value.name, t.with_shape(cut.shape(t.shape))), inp.kind)
