"""Square-then-reduce: per-sample contributions ``C = g² / T`` summed over parameter groups.

Every group of a kernel is a union of whole columns or whole rows, so the group sums need only
two marginals of ``C``: ``col`` (sum over the input axis, one value per output channel) and
``row`` (sum over the output axis, one value per input feature). Both the materialised path
(``col = C.sum(-2)``) and the ghost-norm path (no per-sample gradient formed, see
:mod:`fisherjax.fisher.sites`) produce these marginals, and :func:`reduce_groups` turns them into
groups through :class:`~fisherjax.layout.ModelLayout` — the one place that knows head axes.

==================================  ====================================  ====================
parameter                           groups                                from
==================================  ====================================  ====================
Q / K / V kernel                    ``head`` (kv heads for K, V)          col
fused QKV kernel                    ``head_q``, ``head_k``, ``head_v``    col
O kernel                            ``head`` (along its input axis)       row
q / k / v bias (fused or not)       as their kernels                      col (= C)
MLP in / gate kernel                ``channel``                           col
MLP out kernel                      ``channel`` and ``neuron``            col, row
unembedding ``lm_head`` [d, V]      ``row`` (one per vocabulary entry)    col
embedding, position embedding       ``row``                               row
norms, other biases                 ``element``                           col (= C)
==================================  ====================================  ====================

Tables of more than 50 000 rows are reduced to buckets of 1000 consecutive rows. Values are
sums over each group (head additivity is exact); :func:`group_sizes` gives the number of
parameters per group, so a per-parameter mean is one division away.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from fisherjax.layout import ModelLayout, ParamSpec, Role

ROW_BUCKET_THRESHOLD = 50_000
ROW_BUCKET_SIZE = 1000

_HEAD_ROLES = (Role.Q, Role.K, Role.V)


def needed_marginals(spec: ParamSpec) -> tuple[bool, bool]:
    """Which marginals ``(col, row)`` the groups of a parameter are built from."""
    if spec.kind == "embedding":
        return False, True
    if spec.kind != "kernel":
        return True, False
    if spec.role == Role.O:
        return False, True
    if spec.role == Role.MLP_OUT:
        return True, True
    return True, False


def bucket_rows(x, num_rows: int):
    """Sum consecutive buckets of 1000 rows along the last axis when ``num_rows`` > 50 000."""
    if num_rows <= ROW_BUCKET_THRESHOLD:
        return x
    xp = jnp if not isinstance(x, np.ndarray) else np
    buckets = math.ceil(num_rows / ROW_BUCKET_SIZE)
    pad = buckets * ROW_BUCKET_SIZE - num_rows
    padded = xp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return padded.reshape(*x.shape[:-1], buckets, ROW_BUCKET_SIZE).sum(-1)


def reduce_groups(layout: ModelLayout, path: str, col=None, row=None) -> dict:
    """Group sums of one parameter from its marginals (see the module table).

    ``col``: ``[..., d_out]`` (for 1-D parameters the elementwise values themselves);
    ``row``: ``[..., d_in]`` (for embeddings, per-row sums ``[..., rows]``). Leading axes
    (samples, layers) pass through.
    """
    spec = layout.spec(path)
    role, kind = spec.role, spec.kind
    if kind == "embedding":
        return {"row": bucket_rows(row, spec.shape[-2])}
    if role == Role.QKV:
        return {f"head_{b}": layout.output_heads(path, col, b).sum(-1) for b in "qkv"}
    if role in _HEAD_ROLES:
        return {"head": layout.output_heads(path, col).sum(-1)}
    if kind != "kernel":
        return {"element": col}
    if role == Role.O:
        return {"head": layout.input_heads(path, row).sum(-1)}
    if role in (Role.MLP_IN, Role.MLP_GATE):
        return {"channel": col}
    if role == Role.MLP_OUT:
        return {"channel": col, "neuron": row}
    if role == Role.UNEMBED:
        return {"row": bucket_rows(col, spec.shape[-1])}
    # A kernel with a role we do not group by heads (e.g. a user's extra projection).
    return {"channel": col}


def marginals_of(spec: ParamSpec, squares):
    """``(col, row)`` of a materialised elementwise array (``[..., *param_shape]``)."""
    need_col, need_row = needed_marginals(spec)
    if spec.kind == "embedding":
        return None, squares.sum(-1)
    if spec.kind != "kernel":
        return squares, None
    return (squares.sum(-2) if need_col else None), (squares.sum(-1) if need_row else None)


def groups_of_elementwise(layout: ModelLayout, path: str, squares) -> dict:
    """Group sums of an elementwise (param-shaped, any leading axes) array, e.g. ``C_i`` or ``Î``."""
    col, row = marginals_of(layout.spec(path), squares)
    return reduce_groups(layout, path, col, row)


def group_sizes(layout: ModelLayout, path: str) -> dict[str, np.ndarray]:
    """Number of parameters in each group of ``path`` (same shapes as its group values).

    Built from the marginals of an all-ones array (a column holds ``d_in`` parameters, a row
    ``d_out``) without allocating the parameter itself.
    """
    spec = layout.spec(path)
    shape = spec.shape
    if spec.kind == "embedding":
        col, row = None, np.full(shape[:-1], shape[-1], np.int64)
    elif spec.kind == "kernel":
        col = np.full(shape[:-2] + shape[-1:], shape[-2], np.int64)
        row = np.full(shape[:-1], shape[-1], np.int64)
    else:
        col, row = np.ones(shape, np.int64), None
    return {k: np.asarray(v).astype(np.int64) for k, v in reduce_groups(layout, path, col, row).items()}
