"""Joint low rank of the per-head query–key bilinear form of attention.

Attention scores of head ``h`` are ``q_h·k_hᵀ`` with ``q_h = x·Wq_h + bq_h`` and
``k_h = x'·Wk_h + bk_h`` (``d`` columns each). Only the product matters, so the head
width can shrink from ``d`` to ``r`` by replacing the identity between them with a
rank-``r`` map ``Eq·Ekᵀ``: ``Wq_h ← Wq_h·Eq``, ``Wk_h ← Wk_h·Ek`` (biases likewise).
Unlike a split into two factors this adds no layer: the query and key projections
just get narrower, saving ``2·k·heads·(d − r)`` weights and as many multiply-adds per
row, and the score product gets cheaper too.

The maps minimize the expected score error ``E‖q·(I − Eq·Ekᵀ)·kᵀ‖²`` for queries and
keys of second moments ``Cq = E[qᵀq]`` and ``Ck = E[kᵀk]`` (taken independent): with
``Cq = LqLqᵀ`` and ``Ck = LkLkᵀ`` the best rank-``r`` approximation of ``Lqᵀ·Lk``
(``U·S·Vᵀ``) gives ``Eq = Lq⁻ᵀ·U_r·S_r^½`` and ``Ek = Lk⁻ᵀ·V_r·S_r^½``; the relative
score error is the discarded fraction of ``Σ S²``. ``Cq`` and ``Ck`` are ``d×d`` per
head, well estimated from a few hundred calibration rows.

The graph pattern is the one exported by PyTorch/Hugging Face encoders::

    MatMul(x, Wq) [→ Add(bq)] → Reshape(.., H, d) → Transpose(0,2,1,3) ─┐
    MatMul(x', Wk) [→ Add(bk)] → Reshape(.., H, d) → Transpose(0,2,3,1) ─┴→ MatMul (scores)

with the head width ``d`` a constant of the Reshape's shape (directly or as the last
input of a Concat). The 1/√d scaling of the scores is a separate constant and is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import scipy.linalg
from onnxopt.passes.common.layers import find_layers
from onnxopt.passes.common.linalg import augmented_gram
from onnxopt.passes.common.stats import InputStats, collect_input_stats

from onnxopt.graph import GraphIndex, NameGenerator, is_default_domain, node_attribute, remove_unused, set_initializer

__all__ = [
    "HeadPair",
    "apply_head_ranks",
    "find_head_pairs",
    "head_error_curve",
    "input_moment",
    "joint_qk",
    "plan_head_pairs",
    "set_statistics",
    "unmatched_score_matmuls",
]


def joint_qk(
    tq: np.ndarray, tk: np.ndarray, gram_q: np.ndarray, gram_k: np.ndarray, heads: int, rank: int, ridge: float = 1e-6
) -> tuple[np.ndarray, np.ndarray, float]:
    """Return the narrowed ``tq`` and ``tk`` (``k × heads·rank``) and the relative score error.

    ``tq`` and ``tk`` are the query and key weights with their bias as a last row
    (``(k + 1) × heads·d``); ``gram_q`` and ``gram_k`` are the second moments of the
    inputs with a constant 1 appended (``(k + 1)²``). Head ``h`` owns columns
    ``h·d … (h + 1)·d − 1`` before and ``h·rank …`` after.
    """
    tq, tk = np.asarray(tq, np.float64), np.asarray(tk, np.float64)
    d = tq.shape[1] // heads
    if tq.shape[1] != tk.shape[1] or tq.shape[1] != heads * d or not 1 <= rank <= d:
        raise ValueError(f"bad shapes {tq.shape}, {tk.shape} for {heads} heads of rank {rank}")
    new_q = np.zeros((tq.shape[0], heads * rank))
    new_k = np.zeros((tk.shape[0], heads * rank))
    lost = total = 0.0
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        lq = _cholesky(tq[:, cols].T @ gram_q @ tq[:, cols], ridge)
        lk = _cholesky(tk[:, cols].T @ gram_k @ tk[:, cols], ridge)
        u, s, vt = np.linalg.svd(lq.T @ lk)
        root = np.sqrt(s[:rank])
        eq = scipy.linalg.solve_triangular(lq.T, u[:, :rank] * root, lower=False)
        ek = scipy.linalg.solve_triangular(lk.T, vt[:rank].T * root, lower=False)
        new_q[:, h * rank : (h + 1) * rank] = tq[:, cols] @ eq
        new_k[:, h * rank : (h + 1) * rank] = tk[:, cols] @ ek
        lost += float(np.sum(s[rank:] ** 2))
        total += float(np.sum(s**2))
    return new_q, new_k, lost / total if total > 0 else 0.0


def head_error_curve(
    tq: np.ndarray,
    tk: np.ndarray,
    fit_q: np.ndarray,
    fit_k: np.ndarray,
    heads: int,
    eval_q: np.ndarray | None = None,
    eval_k: np.ndarray | None = None,
    ridge: float = 1e-6,
) -> np.ndarray:
    """Return, for head widths 0..d, the relative score error of the maps fitted on ``fit_q``/``fit_k``.

    The error is measured with the input second moments ``eval_q``/``eval_k`` (default:
    the fitted ones, where width ``r`` loses the discarded fraction of ``Σ S²`` of
    :func:`joint_qk`): with the map ``P_r = Eq·Ekᵀ`` of width ``r`` and query/key moments
    ``Cq``, ``Ck`` of a head, ``E‖q·(I − P_r)·kᵀ‖² = tr((I − P_r)ᵀ·Cq·(I − P_r)·Ck)``,
    summed over heads and divided by ``Σ tr(Cq·Ck)``. Widths 0 and ``d`` give 1 and 0.
    """
    tq, tk = np.asarray(tq, np.float64), np.asarray(tk, np.float64)
    eval_q = fit_q if eval_q is None else eval_q
    eval_k = fit_k if eval_k is None else eval_k
    d = tq.shape[1] // heads
    lost = np.zeros(d + 1)
    total = 0.0
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        lq = _cholesky(tq[:, cols].T @ fit_q @ tq[:, cols], ridge)
        lk = _cholesky(tk[:, cols].T @ fit_k @ tk[:, cols], ridge)
        u, s, vt = np.linalg.svd(lq.T @ lk)
        left = scipy.linalg.solve_triangular(lq.T, u * s, lower=False)  # columns Lq⁻ᵀ·u_i·s_i
        right = scipy.linalg.solve_triangular(lk.T, vt.T, lower=False)  # columns Lk⁻ᵀ·v_i
        cq = tq[:, cols].T @ eval_q @ tq[:, cols]
        ck = tk[:, cols].T @ eval_k @ tk[:, cols]
        total += float(np.sum(cq * ck.T))
        residual = np.eye(d)
        for r in range(d + 1):
            if r:
                residual = residual - np.outer(left[:, r - 1], right[:, r - 1])
            lost[r] += float(np.sum((residual.T @ cq @ residual) * ck.T))
    if total <= 0:
        return np.zeros(d + 1)
    curve = np.clip(lost / total, 0.0, 1.0)
    curve[0], curve[d] = 1.0, 0.0
    return curve


def input_moment(stats: InputStats) -> np.ndarray:
    """Return ``E[aᵀa]`` of the inputs ``a = [x, 1]`` of one single-group layer (``(k + 1)²``) from its statistics."""
    assert stats.gram is not None and stats.total is not None, "collected with gram=True"
    return augmented_gram(stats.gram[0] / max(stats.rows, 1), stats.total[0] / max(stats.rows, 1))


def _cholesky(moment: np.ndarray, ridge: float) -> np.ndarray:
    moment = (moment + moment.T) / 2
    scale = max(float(np.trace(moment)) / len(moment), 1e-30)
    return scipy.linalg.cholesky(moment + ridge * scale * np.eye(len(moment)), lower=True)


@dataclass(frozen=True)
class _Side:
    """One projection (query or key) of a head pair and where its head width is stored."""

    matmul: str
    reshape: str
    activation: str
    weight: str
    bias: str | None
    shape_owner: str
    shape_input: int
    tensors: tuple[str, ...] = ()


@dataclass
class HeadPair:
    """A query/key projection pair feeding one attention score MatMul."""

    query: _Side
    key: _Side
    heads: int
    head_dim: int
    input_dim: int
    tq: np.ndarray | None = None
    tk: np.ndarray | None = None
    gram_q: np.ndarray | None = None
    gram_k: np.ndarray | None = None

    @property
    def params(self) -> int:
        """Return the weights of both projections (biases excluded)."""
        return 2 * self.input_dim * self.heads * self.head_dim

    def params_at(self, rank: int) -> int:
        """Return the weights of both projections narrowed to ``rank`` per head."""
        return 2 * self.input_dim * self.heads * rank


def _producer(index: GraphIndex, name: str, op_type: str) -> onnx.NodeProto | None:
    node = index.producer.get(name)
    return node if node is not None and node.op_type == op_type and is_default_domain(node) else None


def _only_reads_leading_dims(index: GraphIndex, tensor: str, allowed: onnx.NodeProto) -> bool:
    """Return True when every consumer of ``tensor`` but ``allowed`` is a Shape read only at axes 0–1."""
    for node in index.consumers.get(tensor, []):
        if node is allowed:
            continue
        if node.op_type != "Shape" or node_attribute(node, "start") is not None:
            return False
        for user in index.consumers.get(node.output[0], []):
            position = index.constant(user.input[1]) if user.op_type == "Gather" and len(user.input) > 1 else None
            if position is None or position.size != 1 or int(position.reshape(-1)[0]) not in (0, 1):
                return False
    return tensor not in index.outputs


def _side(index: GraphIndex, transposed: str, perm: list[int]) -> tuple[_Side, int, int, int] | None:
    """Match ``MatMul [→ Add] → Reshape(.., H, d) → Transpose(perm)`` back from ``transposed``."""
    transpose = _producer(index, transposed, "Transpose")
    if transpose is None or list(node_attribute(transpose, "perm") or []) != perm or index.uses(transposed) != 1:
        return None
    reshape = _producer(index, transpose.input[0], "Reshape")
    if reshape is None or index.uses(reshape.output[0]) != 1:
        return None
    found = _head_shape(index, reshape)
    if found is None:
        return None
    owner, position, heads, width = found
    data = reshape.input[0]
    bias = None
    add = _producer(index, data, "Add")
    if add is not None:
        values = [index.constant(name) for name in add.input]
        which = [i for i, v in enumerate(values) if v is not None and v.ndim == 1]
        if len(which) != 1 or index.uses(add.input[which[0]]) != 1 or add.input[which[0]] not in index.initializers:
            return None
        bias = add.input[which[0]]
        inner = add.input[1 - which[0]]
        if not _only_reads_leading_dims(index, data, reshape) or index.uses(inner) != 1:
            return None
        data = inner
    elif not _only_reads_leading_dims(index, data, reshape):
        return None
    matmul = _producer(index, data, "MatMul")
    if matmul is None:
        return None
    weight = index.constant(matmul.input[1])
    if (
        weight is None
        or weight.ndim != 2
        or weight.dtype != np.float32
        or index.uses(matmul.input[1]) != 1
        or matmul.input[1] not in index.initializers
    ):
        return None
    if heads == -1:
        heads = weight.shape[1] // width if width > 0 and weight.shape[1] % width == 0 else 0
    if heads < 1 or heads * width != weight.shape[1]:
        return None
    if bias is not None and index.constant(bias).shape != (weight.shape[1],):  # type: ignore[union-attr]
        return None
    side = _Side(
        matmul.output[0],
        reshape.output[0],
        matmul.input[0],
        matmul.input[1],
        bias,
        owner,
        position,
        (matmul.output[0], reshape.input[0], reshape.output[0], transposed),
    )
    return side, heads, width, weight.shape[0]


def _head_shape(index: GraphIndex, reshape: onnx.NodeProto) -> tuple[str, int, int, int] | None:
    """Return (node or initializer holding the head width, its input slot or -1, heads, width)."""
    shape = index.constant(reshape.input[1])
    if shape is not None:
        if shape.shape != (4,) or int(shape[3]) < 1:
            return None
        return reshape.input[1], -1, int(shape[2]), int(shape[3])
    concat = _producer(index, reshape.input[1], "Concat")
    if concat is None or len(concat.input) != 4 or index.uses(concat.output[0]) != 1:
        return None
    heads, width = index.constant(concat.input[2]), index.constant(concat.input[3])
    if heads is None or width is None or heads.size != 1 or width.size != 1 or int(width.reshape(-1)[0]) < 1:
        return None
    return concat.output[0], 3, int(heads.reshape(-1)[0]), int(width.reshape(-1)[0])


def find_head_pairs(model: onnx.ModelProto) -> list[HeadPair]:
    """Return the query/key pairs of the main graph whose head width can be narrowed."""
    index = GraphIndex(model.graph)
    pairs = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or not is_default_domain(node) or index.constant(node.input[1]) is not None:
            continue
        query = _side(index, node.input[0], [0, 2, 1, 3])
        key = _side(index, node.input[1], [0, 2, 3, 1])
        if query is None or key is None or query[1:] != key[1:]:
            continue
        pairs.append(HeadPair(query[0], key[0], query[1], query[2], query[3]))
    return pairs


def _augmented_weight(index: GraphIndex, side: _Side) -> np.ndarray:
    weight = np.asarray(index.constant(side.weight), np.float64)
    bias = np.zeros(weight.shape[1]) if side.bias is None else np.asarray(index.constant(side.bias), np.float64)
    return np.vstack([weight, bias[None, :]])


def plan_head_pairs(model: onnx.ModelProto, samples: list, *, seed: int = 0) -> list[HeadPair]:
    """Find the head pairs and gather their weights and input second moments (with a constant 1 appended)."""
    pairs = find_head_pairs(model)
    if not pairs or not samples:
        return pairs
    keys = {p.query.matmul for p in pairs} | {p.key.matmul for p in pairs}
    layers = [layer for layer in find_layers(model.graph, ("MatMul",))[0] if layer.key in keys]
    set_statistics(model, pairs, collect_input_stats(model, layers, samples, gram=True, seed=seed))
    return pairs


def set_statistics(model: onnx.ModelProto, pairs: list[HeadPair], stats: dict[str, InputStats]) -> None:
    """Set the augmented weights and input second moments of ``pairs`` from layer statistics (by layer key)."""
    index = GraphIndex(model.graph)
    for pair in pairs:
        pair.gram_q, pair.gram_k = (input_moment(stats[side.matmul]) for side in (pair.query, pair.key))
        pair.tq, pair.tk = _augmented_weight(index, pair.query), _augmented_weight(index, pair.key)


#: Element-wise ops allowed between a score MatMul and its Softmax.
_SCORE_PATH = ("Add", "Cast", "Div", "Mul", "Sub", "Where")


def unmatched_score_matmuls(model: onnx.ModelProto, pairs: list[HeadPair]) -> list[str]:
    """Return the outputs of MatMuls of two activations feeding a Softmax (attention scores) not in ``pairs``."""
    index = GraphIndex(model.graph)
    matched = {
        index.consumers[p.query.tensors[-1]][0].output[0] for p in pairs if index.consumers.get(p.query.tensors[-1])
    }
    found = []
    for node in model.graph.node:
        if (
            node.op_type != "MatMul"
            or node.output[0] in matched
            or any(index.constant(name) is not None for name in node.input)
        ):
            continue
        tensor = node.output[0]
        for _ in range(len(_SCORE_PATH) + 1):
            users = index.consumers.get(tensor, [])
            if len(users) != 1:
                break
            if users[0].op_type == "Softmax":
                found.append(node.output[0])
                break
            if users[0].op_type not in _SCORE_PATH:
                break
            tensor = users[0].output[0]
    return found


def apply_head_ranks(model: onnx.ModelProto, pairs: list[HeadPair], ranks: list[int]) -> onnx.ModelProto:
    """Return a copy of ``model`` with each pair narrowed to its rank per head (0 or ≥ head width: unchanged)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    names = NameGenerator(result)
    index = GraphIndex(graph)
    changed = False
    for pair, rank in zip(pairs, ranks, strict=True):
        if rank <= 0 or rank >= pair.head_dim:
            continue
        if pair.tq is None or pair.gram_q is None or pair.tk is None or pair.gram_k is None:
            raise ValueError("head pair has no calibration statistics (use plan_head_pairs)")
        new_q, new_k, _ = joint_qk(pair.tq, pair.tk, pair.gram_q, pair.gram_k, pair.heads, rank)
        for side, value in ((pair.query, new_q), (pair.key, new_k)):
            set_initializer(graph, side.weight, value[:-1].astype(np.float32))
            if side.bias is not None:
                set_initializer(graph, side.bias, value[-1].astype(np.float32))
            _set_head_width(graph, index, names, side, rank)
        changed = True
    if changed:
        stale = {
            t
            for pair, rank in zip(pairs, ranks, strict=True)
            if 0 < rank < pair.head_dim
            for side in (pair.query, pair.key)
            for t in side.tensors
        }
        kept = [v for v in graph.value_info if v.name not in stale]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        remove_unused(graph)
    return result


def _set_head_width(graph: onnx.GraphProto, index: GraphIndex, names: NameGenerator, side: _Side, rank: int) -> None:
    """Point the Reshape (or its Concat) at a fresh constant with head width ``rank``."""
    if side.shape_input < 0:
        shape = np.array(index.constant(side.shape_owner), dtype=np.int64)
        shape[3] = rank
        fresh = names.fresh(f"{side.shape_owner}_heads{rank}")
        set_initializer(graph, fresh, shape)
        index.producer[side.reshape].input[1] = fresh
        return
    concat = index.producer[side.shape_owner]
    old = index.constant(concat.input[side.shape_input])
    fresh = names.fresh(f"{side.shape_owner}_heads{rank}")
    set_initializer(graph, fresh, np.full(old.shape, rank, dtype=old.dtype))  # type: ignore[union-attr]
    concat.input[side.shape_input] = fresh
