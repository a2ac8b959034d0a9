"""Fuse rope (and the layout transposes) into PagedAttention's prologue.

Pre: Rope raised; attention in layout "bhtd" with q = Rope(Transpose(Xq, 1, 2), c, s),
k = Rope(Transpose(Xk, 1, 2), c, s), v = Transpose(Xv, 1, 2), c/s = Reshape([1, T, D] ->
[1, 1, T, D]), each Rope's output of its input's type, or promoted to the tables' dtype and
cast straight back (OLMo's float32 tables: the prologue rotates in the promoted dtype too).
Post: PagedAttention(layout="bthd", rope=True)(Xq, Xk, Xv, cos, sin). Otherwise, when q, k
and v are each computed from a Transpose(X, 1, 2) by ops over the last dimension alone
(Slice, Concat, a Rope as above: partial rotary rotates a slice of each head), those ops are
rebuilt over X in layout [1, T, H, D] (the rope tables viewed as [1, T, 1, d]) and the op
switches to layout "bthd": the rope stays a node of its own. A rope applied before the
heads move (q = Transpose(Reshape(Rope(Yq, c, s) -> [1, T, H, D]), 1, 2), c/s [T, 1, D]: a
custom module's rope ahead of kiln.attention) fuses too, with Yq and c/s viewed token-major.
Then partial rotary moved token-major, q = Concat(Rope(Slice(Xq, 0, R)), Slice(Xq, R, D))
(each over the last dim, the same for k, tables [1, T, 1, R] views of [1, T, R] ones),
fuses as PagedAttention(rope=True, rotary_dim=R)(Xq, Xk, v, cos, sin). Ops over each head's
row alone (an RMSNorm or LayerNorm, whose weight is per column, a Cast) move with the
transposes too: q/k norms applied after the heads move (Gemma3's) are rebuilt over X, and a
full-width rope moved token-major, q = Rope(Xq, c, s) (the same for k, tables [1, T, 1, D]
views of [1, T, D] ones), fuses as PagedAttention(rope=True)(Xq, Xk, v, cos, sin).
"""

from __future__ import annotations

from dataclasses import replace

from compiler.passes.rewrite import Rewriter, rewrite
from ir import ops
from ir.graph import Graph, Node
from ir.types import normalize_dim

# ops over each row of the last dim alone, their other inputs (weights) per column: they
# compute the same in either layout
ROW_OPS = (ops.RMSNorm, ops.LayerNorm, ops.Cast)


def _untransposed(rw: Rewriter, name: str) -> str | None:
    t = rw.producer(name, ops.Transpose)
    return t.inputs[0] if t and {t.op.dim0 % 4, t.op.dim1 % 4} == {1, 2} else None


def _table(rw: Rewriter, view: str, unit: int = 1) -> str | None:
    """View of a [1, T, d] cos/sin table with a unit dim inserted at `unit` ([1, 1, T, d];
    [1, T, 1, d] at 2) -> the table."""
    r = rw.producer(view, ops.Reshape)
    if r is None:
        return None
    src = rw.type_of(r.inputs[0]).shape
    want = (1, *src[1:unit], 1, *src[unit:])
    return r.inputs[0] if len(src) == 3 and rw.type_of(view).shape == want else None


def _movable(rw: Rewriter, name: str) -> bool:
    """Whether `name` ([1, H, T, D]) is a Transpose(X, 1, 2), or made from such values by
    Slice/Concat over the last dim, non-promoting Ropes with [1, 1, T, d] tables and row ops
    (ROW_OPS)."""
    if _untransposed(rw, name):
        return True
    node, rank = rw.producer(name), rw.type_of(name).rank
    if node is None or rank != 4:
        return False
    op = node.op
    if isinstance(op, ops.Slice | ops.Concat):
        return normalize_dim(op.dim, rank) == rank - 1 and all(_movable(rw, n) for n in node.inputs)
    if isinstance(op, ops.Rope):
        x, cos, sin = node.inputs
        same = rw.type_of(x) == rw.type_of(name)
        return same and bool(_table(rw, cos) and _table(rw, sin)) and _movable(rw, x)
    if isinstance(op, ROW_OPS):
        return _movable(rw, node.inputs[0])
    return False


def _moved(rw: Rewriter, name: str, tables: dict[str, str]) -> str:
    """`name` computed in layout [1, T, H, D] (`_movable` holds); `tables`: each rope table
    already viewed as [1, T, 1, d]."""
    if x := _untransposed(rw, name):
        return x
    node = rw.producer(name)
    op = node.op
    if isinstance(op, ops.Rope):
        x, *cs = node.inputs
        return rw.add(op, _moved(rw, x, tables), *(_token_major(rw, c, tables) for c in cs))[0]
    if isinstance(op, ROW_OPS):
        return rw.add(op, _moved(rw, node.inputs[0], tables), *node.inputs[1:])[0]
    moved = (_moved(rw, n, tables) for n in node.inputs)
    return rw.add(replace(op, dim=-1), *moved)[0]


def _token_major(rw: Rewriter, view: str, tables: dict[str, str]) -> str:
    table = _table(rw, view)
    if table not in tables:
        _, t, d = rw.type_of(table).shape
        tables[table] = rw.add(ops.Reshape((1, t, 1, d)), table)[0]
    return tables[table]


def _token_rope(rw: Rewriter, name: str) -> Node | None:
    """The Rope under `name` = Transpose(Reshape(Rope(Y [T, H, D], cos, sin) -> [1, T, H, D]),
    1, 2), with [T, 1, D] tables and no promotion: rope applied before the heads move."""
    r = rw.producer(_untransposed(rw, name) or "", ops.Reshape)
    rope = rw.producer(r.inputs[0], ops.Rope) if r else None
    if rope is None or rw.type_of(r.inputs[0]).rank != 3:
        return None
    t, _, d = rw.type_of(rope.inputs[0]).shape
    tables = all(rw.type_of(c).shape == (t, 1, d) for c in rope.inputs[1:])
    return rope if tables and rw.type_of(rope.inputs[0]) == rw.type_of(r.inputs[0]) else None


def _rotated_before(rw: Rewriter, op: ops.PagedAttention, q: str, k: str, xv: str):
    """Fused attention for q and k roped in [T, H, D] (a custom module's rope ahead of
    kiln.attention), or None."""
    rq, rk = _token_rope(rw, q), _token_rope(rw, k)
    if not (rq and rk and rq.inputs[1:] == rk.inputs[1:]):
        return None
    xq, xk = (
        rw.add(ops.Reshape((1, *rw.type_of(r.inputs[0]).shape)), r.inputs[0])[0] for r in (rq, rk)
    )
    t, _, d = rw.type_of(rq.inputs[1]).shape
    cos, sin = (rw.add(ops.Reshape((1, t, d)), c)[0] for c in rq.inputs[1:])
    return rw.add(replace(op, layout="bthd", rope=True), xq, xk, xv, cos, sin)[0]


def _rope_of(rw: Rewriter, name: str) -> Node | None:
    """The Rope computing `name` in its own dtype: Rope(x) of x's type, or Cast(Rope(x)) to
    x's dtype (the rope promoted to its tables' dtype, then rounded back)."""
    cast = rw.producer(name, ops.Cast)
    rope = rw.producer(cast.inputs[0] if cast else name, ops.Rope)
    return rope if rope and rw.type_of(rope.inputs[0]) == rw.type_of(name) else None


def _last_dim_slice(rw: Rewriter, name: str, start: int, end: int) -> Node | None:
    node = rw.producer(name, ops.Slice)
    if node is None or normalize_dim(node.op.dim, rw.type_of(name).rank) != 3:
        return None
    width = rw.type_of(node.inputs[0]).shape[-1]
    bounds = slice(node.op.start, node.op.end, node.op.step).indices(width)
    return node if bounds == (start, end, 1) else None


def _same_value(rw: Rewriter, a: str, b: str) -> bool:
    """`a` is `b`, or both come from one op on the same inputs (the move's copies)."""
    if a == b:
        return True
    na, nb = rw.producer(a), rw.producer(b)
    return bool(na and nb and na.op == nb.op and na.inputs == nb.inputs)


def _rotary(rw: Rewriter, name: str) -> tuple[str, Node] | None:
    """(X, its Rope) when `name` [1, T, H, D] = Concat(Rope(Slice(X, 0, R)), Slice(X, R, D))
    over the last dim (partial rotary) or Rope(X) (full), the Rope in X's dtype (or cast
    back to it)."""
    if (rope := _rope_of(rw, name)) is not None:
        return rope.inputs[0], rope
    cat = rw.producer(name, ops.Concat)
    if cat is None or len(cat.inputs) != 2 or normalize_dim(cat.op.dim, 4) != 3:
        return None
    rope = _rope_of(rw, cat.inputs[0])
    r, dim = rw.type_of(cat.inputs[0]).shape[-1], rw.type_of(name).shape[-1]
    head = _last_dim_slice(rw, rope.inputs[0], 0, r) if rope else None
    tail = _last_dim_slice(rw, cat.inputs[1], r, dim)
    if head and tail and _same_value(rw, head.inputs[0], tail.inputs[0]):
        return head.inputs[0], rope
    return None


def _fuse_token_major_rope(node: Node, rw: Rewriter) -> dict[str, str] | None:
    op = node.op
    if not isinstance(op, ops.PagedAttention) or op.layout != "bthd" or op.rope:
        return None
    pq, pk = _rotary(rw, node.inputs[0]), _rotary(rw, node.inputs[1])
    if not (pq and pk) or pq[1].inputs[1:] != pk[1].inputs[1:]:
        return None
    tables = [_table(rw, c, unit=2) for c in pq[1].inputs[1:]]
    if None in tables:
        return None
    r = rw.type_of(tables[0]).shape[-1]
    fused = replace(op, rope=True, rotary_dim=r if r < op.head_dim else None)
    return {node.outputs[0].name: rw.add(fused, pq[0], pk[0], node.inputs[2], *tables)[0]}


def fuse_rope_attention(graph: Graph) -> Graph:
    tables: dict[str, str] = {}  # shared by the layers: one view of each table

    def rule(node: Node, rw: Rewriter) -> dict[str, str] | None:
        op = node.op
        if not isinstance(op, ops.PagedAttention) or op.layout != "bhtd" or op.rope:
            return None
        q, k, v = node.inputs[:3]
        xv = _untransposed(rw, v)
        rq, rk = _rope_of(rw, q), _rope_of(rw, k)
        if rq and rk and rq.inputs[1:] == rk.inputs[1:] and xv:
            xq, xk = _untransposed(rw, rq.inputs[0]), _untransposed(rw, rk.inputs[0])
            cos, sin = _table(rw, rq.inputs[1]), _table(rw, rq.inputs[2])
            if xq and xk and cos and sin:
                fused = replace(op, layout="bthd", rope=True)
                return {node.outputs[0].name: rw.add(fused, xq, xk, xv, cos, sin)[0]}
        if xv and (fused := _rotated_before(rw, op, q, k, xv)):
            return {node.outputs[0].name: fused}
        if all(_movable(rw, n) for n in (q, k, v)):
            moved = (_moved(rw, n, tables) for n in (q, k, v))
            return {node.outputs[0].name: rw.add(replace(op, layout="bthd"), *moved)[0]}
        return None

    return rewrite(rewrite(graph, rule), _fuse_token_major_rope)
