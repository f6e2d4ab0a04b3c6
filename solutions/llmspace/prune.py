"""Chapter 4 — pruning: unstructured, structured, N:M (2:4) and activation-aware (Wanda) masks.

Pruning sets weights to zero. Whether that saves anything depends on *where* the zeros are:

* **unstructured** zeros (any weight may go) keep accuracy best, but a zero inside a dense tensor still
  costs its bytes; storing only the survivors costs an index per survivor (chapter 1: CSR beats dense
  fp16 only above 67% sparsity) and dense hardware computes the zeros anyway;
* **structured** pruning removes whole output neurons, channels or attention heads, so the matrices
  physically shrink — every byte and every flop saved is real, but accuracy drops faster;
* **N:M** (2:4) keeps 2 of every 4 consecutive weights: half the values plus 2 bits of position per kept
  value (1.125 bytes per fp16 weight instead of 2), a pattern sparse tensor cores execute directly.

Which weights to drop is a separate choice: **magnitude** (smallest ``|W|``, per layer or globally) or
**Wanda** (``|W_ij| * ||X_j||``, the weight times the norm of the input feature it multiplies, measured
on calibration data — a small weight on a huge activation matters).

Masks here are boolean tensors, ``True`` = keep, the same shape as the weight. Counts follow
:mod:`torch.nn.utils.prune` (``round(sparsity * n)`` weights pruned). Where magnitudes tie at the
threshold, which of the tied weights goes is arbitrary: this library takes ``torch.topk``'s choice (so
its tests can compare masks with torch's), and any other choice with the same count is equally valid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from llmspace.sparse import format_bytes, index_dtype

__all__ = [
    "check_sparsity", "n_to_prune", "magnitude_mask", "global_magnitude_mask", "channel_norms",
    "structured_mask", "shrink_mlp", "head_norms", "remove_heads", "nm_mask", "is_nm_sparse",
    "Sparse24", "compress_2to4", "decompress_2to4", "compressed_2to4_bytes", "wanda_scores",
    "wanda_mask", "input_norms", "MaskHandle", "apply_masks", "sparsity_schedule", "iterative_prune",
    "sparsity_report",
    "linear_weights",
]


# --------------------------------------------------------------------------------------------------
# Validation helpers (given to students)
# --------------------------------------------------------------------------------------------------

def check_tensor(name: str, value, *, ndim: int | None = None, floating: bool = True) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``value`` is a (floating, ``ndim``-D) tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")


def check_sparsity(sparsity) -> float:
    """The fraction of weights to prune must be a number in [0, 1); returns it as a float."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a float in [0, 1), got {type(sparsity).__name__}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    return float(sparsity)


def check_nm(n, m, n_cols: int) -> None:
    """N:M needs 1 <= n <= m and groups of m that tile the last dimension (``n_cols``)."""
    if not (isinstance(n, int) and isinstance(m, int)) or isinstance(n, bool) or isinstance(m, bool):
        raise TypeError(f"n and m must be ints, got {type(n).__name__} and {type(m).__name__}")
    if not 1 <= n <= m:
        raise ValueError(f"N:M needs 1 <= n <= m, got n={n}, m={m}")
    if n_cols % m:
        raise ValueError(f"m={m} must divide the last dimension, got {n_cols} columns")


def n_to_prune(sparsity: float, numel: int) -> int:
    """Number of weights to prune: ``round(sparsity * numel)`` (Python's round, as torch.nn.utils.prune)."""
    return round(check_sparsity(sparsity) * numel)


# --------------------------------------------------------------------------------------------------
# Unstructured magnitude pruning
# --------------------------------------------------------------------------------------------------

def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Layer-wise magnitude mask: prune the ``round(sparsity * numel)`` smallest ``|weight|``.

    Args:
        weight: any-shape floating tensor.
        sparsity: fraction of entries to prune, in [0, 1).

    Returns:
        bool tensor, ``weight``'s shape, ``True`` = keep. Same mask as
        ``torch.nn.utils.prune.l1_unstructured(module, "weight", amount=sparsity)``.
    """
    check_tensor("weight", weight)
    k = n_to_prune(sparsity, weight.numel())
    mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if k:
        mask[torch.topk(weight.detach().abs().flatten(), k, largest=False).indices] = False
    return mask.view_as(weight)


def global_magnitude_mask(weights: list, sparsity: float) -> list:
    """Global magnitude pruning: one threshold across all tensors, so layers end up unevenly sparse.

    Args:
        weights: a list of floating tensors (any shapes), e.g. every Linear weight of a model.
        sparsity: fraction of *all* their entries to prune, in [0, 1).

    Returns:
        A list of bool masks (``True`` = keep), one per weight, same shapes. Exactly
        ``round(sparsity * total)`` entries are pruned in total, those with the smallest ``|w|`` over all
        tensors together: no pruned entry has a larger ``|w|`` than a kept one. When several entries tie
        at the threshold magnitude, prune exactly as many of them as the count needs — which ones is
        unspecified (``torch.topk``, a stable sort or any other order is fine). Without ties this is the
        mask of ``torch.nn.utils.prune.global_unstructured(..., pruning_method=L1Unstructured)``. The
        weights themselves are not modified.

    Raises:
        TypeError: if ``weights`` is not a list of floating tensors.
        ValueError: if ``sparsity`` is outside [0, 1) or the list is empty.
    """
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list of tensors, got {type(weights).__name__}")
    if not weights:
        raise ValueError("weights must not be empty")
    for i, w in enumerate(weights):
        check_tensor(f"weights[{i}]", w)
    ### BEGIN SOLUTION
    scores = torch.cat([w.detach().abs().flatten() for w in weights])
    k = n_to_prune(sparsity, scores.numel())
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        keep[torch.topk(scores, k, largest=False).indices] = False
    masks, start = [], 0
    for w in weights:  # cut the flat mask back into one piece per tensor
        masks.append(keep[start:start + w.numel()].view_as(w))
        start += w.numel()
    return masks
    ### END SOLUTION


# --------------------------------------------------------------------------------------------------
# Structured pruning: whole neurons, channels and heads, physically removed
# --------------------------------------------------------------------------------------------------

def channel_norms(weight: torch.Tensor, dim: int = 0, p: float = 2) -> torch.Tensor:
    """L_p norm of each slice along ``dim`` (over all other dims): ``(weight.shape[dim],)`` float."""
    check_tensor("weight", weight)
    if not -weight.ndim <= dim < weight.ndim:
        raise ValueError(f"dim must be in [{-weight.ndim}, {weight.ndim}), got {dim}")
    other = [d for d in range(weight.ndim) if d != dim % weight.ndim]
    return torch.linalg.vector_norm(weight.detach(), ord=p, dim=other)


def structured_mask(weight: torch.Tensor, sparsity: float, dim: int = 0, p: float = 2) -> torch.Tensor:
    """Prune the ``round(sparsity * weight.shape[dim])`` slices along ``dim`` with the smallest L_p norm.

    For an ``nn.Linear`` weight ``(out, in)``, ``dim=0`` prunes output neurons and ``dim=1`` input
    channels. Returns a bool mask of ``weight``'s shape (whole slices ``True``/``False``); the same
    mask as ``torch.nn.utils.prune.ln_structured(module, "weight", sparsity, n=p, dim=dim)``.
    """
    norms = channel_norms(weight, dim, p)
    k = n_to_prune(sparsity, norms.numel())
    keep = torch.zeros_like(norms, dtype=torch.bool)
    keep[torch.topk(norms, norms.numel() - k).indices] = True  # torch keeps the top (n - k)
    shape = [1] * weight.ndim
    shape[dim] = -1
    return keep.view(shape).expand_as(weight).clone()


def _linear_like(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def shrink_mlp(fc_in: nn.Linear, fc_out: nn.Linear, keep: torch.Tensor) -> tuple[nn.Linear, nn.Linear]:
    """Physically remove hidden neurons of an MLP ``fc_out(act(fc_in(x)))``.

    Args:
        fc_in: ``Linear(d, h)``; its rows (and bias entries) are the hidden neurons.
        fc_out: ``Linear(h, d)``; its columns read the hidden neurons.
        keep: ``(h,)`` bool, ``True`` for neurons that stay.

    Returns:
        New ``Linear(d, h')`` and ``Linear(h', d)`` with ``h' = keep.sum()``. For an activation with
        ``act(0) = 0`` the result equals the original MLP with the removed neurons' rows and biases
        zeroed — but now the matrices (bytes and flops) are smaller by ``h - h'`` neurons.
    """
    if not isinstance(fc_in, nn.Linear) or not isinstance(fc_out, nn.Linear):
        raise TypeError(f"fc_in and fc_out must be nn.Linear, got {type(fc_in).__name__} "
                        f"and {type(fc_out).__name__}")
    if fc_out.in_features != fc_in.out_features:
        raise ValueError(f"fc_out.in_features ({fc_out.in_features}) must equal "
                         f"fc_in.out_features ({fc_in.out_features})")
    if keep.dtype != torch.bool or keep.shape != (fc_in.out_features,):
        raise ValueError(f"keep must be a bool tensor of shape ({fc_in.out_features},), "
                         f"got {keep.dtype} {tuple(keep.shape)}")
    idx = keep.nonzero().flatten()
    new_in = _linear_like(fc_in, fc_in.weight.detach()[idx],
                          None if fc_in.bias is None else fc_in.bias.detach()[idx])
    new_out = _linear_like(fc_out, fc_out.weight.detach()[:, idx],
                           None if fc_out.bias is None else fc_out.bias.detach())
    return new_in, new_out


def _check_heads(hidden: int, n_heads: int) -> int:
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads < 1:
        raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")
    if hidden % n_heads:
        raise ValueError(f"n_heads={n_heads} must divide the attention width, got {hidden}")
    return hidden // n_heads


def head_norms(o_proj: nn.Linear, n_heads: int, p: float = 2) -> torch.Tensor:
    """Importance of each attention head: the L_p norm of its block of ``o_proj`` columns.

    ``o_proj`` is ``Linear(n_heads * head_dim, d)``; head ``h`` writes to the residual stream only through
    columns ``h*head_dim:(h+1)*head_dim``. Returns ``(n_heads,)`` float.
    """
    head_dim = _check_heads(o_proj.in_features, n_heads)
    w = o_proj.weight.detach().view(o_proj.out_features, n_heads, head_dim)
    return torch.linalg.vector_norm(w, ord=p, dim=(0, 2))


def remove_heads(q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, o_proj: nn.Linear,
                 n_heads: int, keep: torch.Tensor) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """Physically remove attention heads from separate q/k/v/o projections (multi-head attention).

    Args:
        q_proj, k_proj, v_proj: ``Linear(d, n_heads * head_dim)``, heads laid out contiguously.
        o_proj: ``Linear(n_heads * head_dim, d)``.
        keep: ``(n_heads,)`` bool.

    Returns:
        New projections for ``keep.sum()`` heads: q/k/v lose the removed heads' rows, o_proj their
        columns. Attention over the kept heads is unchanged (each head's softmax only sees its own q/k),
        so the model equals the original with the removed heads' outputs zeroed.
    """
    width = q_proj.out_features
    if not (k_proj.out_features == v_proj.out_features == o_proj.in_features == width):
        raise ValueError("q/k/v out_features and o_proj in_features must all be equal, got "
                         f"{q_proj.out_features}, {k_proj.out_features}, {v_proj.out_features}, "
                         f"{o_proj.in_features}")
    head_dim = _check_heads(width, n_heads)
    if keep.dtype != torch.bool or keep.shape != (n_heads,):
        raise ValueError(f"keep must be a bool tensor of shape ({n_heads},), got {keep.dtype} {tuple(keep.shape)}")
    idx = keep.repeat_interleave(head_dim).nonzero().flatten()  # the kept heads' feature columns
    new = []
    for proj in (q_proj, k_proj, v_proj):
        new.append(_linear_like(proj, proj.weight.detach()[idx],
                                None if proj.bias is None else proj.bias.detach()[idx]))
    new.append(_linear_like(o_proj, o_proj.weight.detach()[:, idx],
                            None if o_proj.bias is None else o_proj.bias.detach()))
    return tuple(new)


# --------------------------------------------------------------------------------------------------
# N:M sparsity and the compressed 2:4 format
# --------------------------------------------------------------------------------------------------

def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M mask: in every group of ``m`` consecutive entries along the last dim, keep the ``n`` largest.

    Args:
        weight: ``(..., n_cols)`` floating tensor; ``n_cols`` must be a multiple of ``m``. For an
            ``nn.Linear`` weight ``(out, in)`` the groups run along the input dimension, which is the
            layout sparse tensor cores need. Pass Wanda scores instead of a weight to get Wanda N:M.
        n, m: keep ``n`` of every ``m`` (2:4 by default).

    Returns:
        bool tensor of ``weight``'s shape, exactly ``n`` ``True`` per group: the ``n`` largest ``|weight|``
        of the group, so no dropped entry is larger in magnitude than a kept one of its group. When
        entries tie at the ``n``-th largest magnitude, keep exactly ``n`` — which of the tied ones is
        unspecified. ``weight`` is not modified.

    Raises:
        ValueError: if ``m`` does not divide the last dimension or not ``1 <= n <= m``.
    """
    check_tensor("weight", weight)
    if weight.ndim == 0:
        raise ValueError("weight must have at least one dimension")
    check_nm(n, m, weight.shape[-1])
    ### BEGIN SOLUTION
    groups = weight.detach().abs().reshape(-1, m)              # one row per group of m
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    return keep.view(weight.shape)
    ### END SOLUTION


def is_nm_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True if every group of ``m`` consecutive entries along the last dim has at most ``n`` non-zeros."""
    check_tensor("weight", weight, floating=False)
    if weight.ndim == 0 or weight.shape[-1] % m:
        return False
    return bool(((weight.reshape(-1, m) != 0).sum(1) <= n).all())


@dataclass(frozen=True, eq=False)
class Sparse24:
    """A 2:4-sparse matrix stored as its kept values plus 2-bit positions.

    Attributes:
        values: ``(rows, cols // 2)`` — the two kept entries of each group of 4, in column order.
        meta: ``(rows, ceil(cols / 8))`` uint8 — the position (0..3) of each kept value inside its
            group, 2 bits each, packed 4 per byte, least-significant bits first: kept value ``j`` of a
            row sits in byte ``j // 4`` at bits ``2 * (j % 4)`` and ``2 * (j % 4) + 1``.
        shape: ``(rows, cols)`` of the dense matrix; ``cols`` is a multiple of 4.
    """

    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]

    def __post_init__(self):
        rows, cols = (int(s) for s in self.shape)
        if cols % 4:
            raise ValueError(f"shape[1] must be a multiple of 4, got {cols}")
        if not isinstance(self.values, torch.Tensor) or tuple(self.values.shape) != (rows, cols // 2):
            raise ValueError(f"values must be a tensor of shape ({rows}, {cols // 2}), "
                             f"got {getattr(self.values, 'shape', type(self.values).__name__)}")
        n_meta = (cols // 2 + 3) // 4
        if (not isinstance(self.meta, torch.Tensor) or self.meta.dtype != torch.uint8
                or tuple(self.meta.shape) != (rows, n_meta)):
            raise ValueError(f"meta must be a uint8 tensor of shape ({rows}, {n_meta}), "
                             f"got {getattr(self.meta, 'dtype', type(self.meta).__name__)} "
                             f"{tuple(getattr(self.meta, 'shape', ()))}")
        object.__setattr__(self, "shape", (rows, cols))

    @property
    def nbytes(self) -> int:
        """Bytes of values + metadata: ``rows * cols / 2 * value_bytes + rows * ceil(cols / 8)``."""
        return self.values.numel() * self.values.element_size() + self.meta.numel()


def compressed_2to4_bytes(rows: int, cols: int, value_bytes: int) -> int:
    """Exact bytes of :class:`Sparse24` for a ``(rows, cols)`` matrix: half the values + 2 bits each."""
    return rows * (cols // 2) * value_bytes + rows * ((cols // 2 + 3) // 4)


def compress_2to4(weight: torch.Tensor) -> Sparse24:
    """Pack a 2:4-sparse matrix into :class:`Sparse24` (kept values + 2-bit positions).

    Args:
        weight: ``(rows, cols)`` floating tensor, ``cols % 4 == 0``, at most 2 non-zeros in every group
            of 4 consecutive entries of a row (e.g. ``weight * nm_mask(weight)``).

    Returns:
        ``Sparse24`` whose ``values`` keep ``weight``'s dtype. In each group the non-zeros are kept in
        column order; a group with fewer than 2 non-zeros is filled up with its first zero positions
        (stored as value 0), so every group stores exactly 2 values and positions strictly increase.

    Raises:
        ValueError: if ``weight`` is not 2-D, ``cols % 4 != 0`` or a group has more than 2 non-zeros.
    """
    check_tensor("weight", weight, ndim=2)
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"weight's last dimension must be a multiple of 4, got {cols}")
    if not is_nm_sparse(weight, 2, 4):
        raise ValueError("weight is not 2:4 sparse: some group of 4 has more than 2 non-zeros")
    ### BEGIN SOLUTION
    groups = weight.detach().reshape(rows, cols // 4, 4)
    # Sort key: non-zeros first, then by position; the first two positions of each group are kept.
    key = (groups == 0).to(torch.int64) * 4 + torch.arange(4, device=weight.device)
    pos = key.topk(2, dim=-1, largest=False).indices.sort(dim=-1).values     # (rows, groups, 2)
    values = groups.gather(-1, pos).reshape(rows, cols // 2)
    pos = pos.reshape(rows, cols // 2).to(torch.uint8)
    pad = (-pos.shape[1]) % 4                                                 # whole bytes per row
    pos = torch.nn.functional.pad(pos, (0, pad)).view(rows, -1, 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=weight.device)
    meta = (pos << shifts).sum(-1, dtype=torch.uint8)                         # 4 positions per byte
    return Sparse24(values, meta, (rows, cols))
    ### END SOLUTION


def decompress_2to4(packed: Sparse24) -> torch.Tensor:
    """Rebuild the dense ``(rows, cols)`` matrix from :class:`Sparse24` (``values``' dtype and device).

    Raises:
        TypeError: if ``packed`` is not a ``Sparse24``.
    """
    if not isinstance(packed, Sparse24):
        raise TypeError(f"packed must be a Sparse24, got {type(packed).__name__}")
    ### BEGIN SOLUTION
    rows, cols = packed.shape
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.meta.device)
    pos = (packed.meta.unsqueeze(-1) >> shifts) & 3                           # (rows, bytes, 4)
    pos = pos.reshape(rows, -1)[:, :cols // 2].to(torch.int64)
    col = pos + 4 * (torch.arange(cols // 2, device=pos.device) // 2)         # group g holds values 2g, 2g+1
    dense = torch.zeros(rows, cols, dtype=packed.values.dtype, device=packed.values.device)
    dense.scatter_(1, col, packed.values)
    return dense
    ### END SOLUTION


# --------------------------------------------------------------------------------------------------
# Wanda: activation-aware scores
# --------------------------------------------------------------------------------------------------

def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda importance ``|W_ij| * ||X_j||_2`` (Sun et al., 2023).

    Args:
        weight: ``(out, in)`` Linear weight.
        input_norm: ``(in,)`` L2 norm of each input feature over all calibration tokens
            (see :func:`input_norms`).

    Returns:
        ``(out, in)`` float scores: the size of each weight's contribution to the output on the data.
    """
    check_tensor("weight", weight, ndim=2)
    check_tensor("input_norm", input_norm, ndim=1)
    if input_norm.shape[0] != weight.shape[1]:
        raise ValueError(f"input_norm must have {weight.shape[1]} entries (weight's in_features), "
                         f"got {input_norm.shape[0]}")
    return weight.detach().abs() * input_norm.to(weight.dtype)[None, :]


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda unstructured mask: in *each output row*, prune the ``round(sparsity * in)`` lowest scores.

    Wanda compares weights per output (the paper found per-output groups better than per-layer for
    LLMs); each row keeps the same count, which also balances the work per output.
    """
    scores = wanda_scores(weight, input_norm)
    k = n_to_prune(sparsity, weight.shape[1])
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        keep.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, False)
    return keep


@torch.no_grad()
def input_norms(model: nn.Module, linears: dict, batches) -> dict:
    """Run calibration batches through ``model``; return the L2 norm of each input feature per layer.

    Args:
        model: called as ``model(batch)`` for each batch.
        linears: ``{name: nn.Linear}`` — the layers whose inputs to measure.
        batches: an iterable of model inputs.

    Returns:
        ``{name: (in_features,) float32}`` with ``sqrt(sum over all tokens of x_j**2)``, accumulated in
        float64 so long calibration sets do not lose precision.
    """
    sums = {name: torch.zeros(layer.in_features, dtype=torch.float64) for name, layer in linears.items()}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, module.in_features).to(torch.float64)
            sums[name] += (x * x).sum(0).cpu()
        return fn

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in linears.items()]
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return {name: s.sqrt().float() for name, s in sums.items()}


# --------------------------------------------------------------------------------------------------
# Applying masks for real: through fine-tuning and over an iterative schedule
# --------------------------------------------------------------------------------------------------

class MaskHandle:
    """Masks applied to parameters: zeroes them now and keeps them zero through fine-tuning.

    Two mechanisms, because either alone leaks: a gradient hook zeroes the masked gradient entries (so
    plain SGD never moves a pruned weight), and :meth:`reapply` — call it after each ``optimizer.step()``
    — re-zeroes them, because optimizer state from before pruning (momentum, Adam moments) and weight
    decay variants can still move them.
    """

    def __init__(self, params_and_masks: list):
        self.pairs = []
        self.hooks = []
        for i, (param, mask) in enumerate(params_and_masks):
            if not isinstance(param, torch.Tensor) or not isinstance(mask, torch.Tensor):
                raise TypeError(f"entry {i} must be a (parameter, mask) pair of tensors")
            if mask.shape != param.shape or mask.dtype != torch.bool:
                raise ValueError(f"mask {i} must be bool with shape {tuple(param.shape)}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
            mask = mask.to(param.device)
            self.pairs.append((param, mask))
            if param.requires_grad:
                self.hooks.append(param.register_hook(lambda g, mask=mask: g * mask))
        self.reapply()

    @torch.no_grad()
    def reapply(self) -> None:
        for param, mask in self.pairs:
            param.mul_(mask)

    def remove(self) -> None:
        """Stop enforcing (the weights keep their current values)."""
        for h in self.hooks:
            h.remove()
        self.hooks = []


def apply_masks(params_and_masks: list) -> MaskHandle:
    """Zero the pruned weights and keep them zero while fine-tuning; see :class:`MaskHandle`."""
    return MaskHandle(params_and_masks)


def sparsity_schedule(step: int, n_steps: int, final: float, initial: float = 0.0) -> float:
    """Cubic gradual-pruning schedule (Zhu & Gupta, 2017): sparsity after pruning round ``step``.

    ``s(t) = final + (initial - final) * (1 - t / n_steps) ** 3`` for ``t`` in ``0..n_steps``: prunes fast
    while many redundant weights remain, slowly near the target, with fine-tuning between rounds.
    """
    check_sparsity(final)
    check_sparsity(initial)
    if not 0 <= step <= n_steps:
        raise ValueError(f"step must be in [0, {n_steps}], got {step}")
    return final + (initial - final) * (1 - step / n_steps) ** 3


def iterative_prune(layers: dict, final_sparsity: float, n_rounds: int, finetune, score=None) -> MaskHandle:
    """Gradual pruning: ``n_rounds`` of prune → fine-tune, sparsity following :func:`sparsity_schedule`.

    Args:
        layers: ``{name: nn.Linear}`` to prune (each layer pruned to the round's sparsity).
        final_sparsity: sparsity after the last round, in [0, 1).
        n_rounds: number of prune → fine-tune rounds (>= 1).
        finetune: called as ``finetune(handle, round)`` after each round's pruning; it trains the model
            and must call ``handle.reapply()`` after every optimizer step.
        score: ``score(name, weight) -> tensor`` of importances (default ``|weight|``). Rounds are
            cumulative: weights pruned earlier are zero and score lowest, so they stay pruned.

    Returns:
        The last round's :class:`MaskHandle` (still enforcing the final masks).
    """
    if not isinstance(n_rounds, int) or n_rounds < 1:
        raise ValueError(f"n_rounds must be a positive int, got {n_rounds!r}")
    check_sparsity(final_sparsity)
    score = score or (lambda name, w: w.detach().abs())
    handle = None
    for r in range(1, n_rounds + 1):
        sparsity = sparsity_schedule(r, n_rounds, final_sparsity)
        if handle is not None:
            handle.remove()
        pairs = []
        for name, layer in layers.items():
            s = score(name, layer.weight).flatten().float()
            if handle is not None:  # a weight pruned before stays pruned, whatever its new score
                s = s.masked_fill(layer.weight.detach().flatten() == 0, float("-inf"))
            keep = torch.ones_like(s, dtype=torch.bool)
            k = n_to_prune(sparsity, s.numel())
            if k:
                keep[torch.topk(s, k, largest=False).indices] = False
            pairs.append((layer.weight, keep.view_as(layer.weight)))
        handle = apply_masks(pairs)
        finetune(handle, r)
    return handle


def linear_weights(model: nn.Module, skip: tuple = ()) -> dict:
    """``{name: nn.Linear}`` for every Linear of ``model`` whose name contains none of ``skip``."""
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and not any(s in name for s in skip)}


# --------------------------------------------------------------------------------------------------
# Where the bytes go
# --------------------------------------------------------------------------------------------------

def sparsity_report(model: nn.Module, value_bytes: int = 2, skip: tuple = ()) -> list:
    """Bytes of every Linear weight of ``model`` in dense, CSR, bitmask and 2:4 storage.

    Args:
        model: any module; every ``nn.Linear`` weight (2-D) is reported.
        value_bytes: bytes per stored value (2 for fp16/bf16 storage, 4 for fp32).
        skip: substrings of module names to leave out.

    Returns:
        One dict per layer, then a final ``"TOTAL"`` row: ``name``, ``shape``, ``nnz``, ``sparsity``,
        ``dense`` (``rows*cols*value_bytes``), ``csr`` (chapter 1's exact CSR bytes, int32 indices when
        they fit), ``bitmask`` (1 bit per weight + the non-zeros), ``2:4`` (:class:`Sparse24` bytes, or
        ``None`` when the weight is not 2:4 sparse — the total is then ``None`` too).
    """
    if not isinstance(value_bytes, int) or value_bytes < 1:
        raise ValueError(f"value_bytes must be a positive int, got {value_bytes!r}")
    rows = []
    for name, layer in linear_weights(model, skip).items():
        w = layer.weight.detach()
        r, c = w.shape
        nnz = int((w != 0).sum())
        idx_bytes = index_dtype(max(c, nnz)).itemsize
        rows.append({
            "name": name, "shape": (r, c), "nnz": nnz, "sparsity": 1 - nnz / w.numel(),
            "dense": r * c * value_bytes,
            "csr": format_bytes("csr", r, c, nnz, value_bytes, idx_bytes),
            "bitmask": math.ceil(r * c / 8) + nnz * value_bytes,
            "2:4": compressed_2to4_bytes(r, c, value_bytes) if is_nm_sparse(w, 2, 4) else None,
        })
    total = {"name": "TOTAL", "shape": None, "nnz": sum(x["nnz"] for x in rows)}
    n = sum(x["shape"][0] * x["shape"][1] for x in rows)
    total["sparsity"] = 1 - total["nnz"] / n if n else 0.0
    for key in ("dense", "csr", "bitmask"):
        total[key] = sum(x[key] for x in rows)
    total["2:4"] = None if any(x["2:4"] is None for x in rows) else sum(x["2:4"] for x in rows)
    return rows + [total]
