"""Float64 PyTorch references shared by the tests."""

import torch
import torch.nn.functional as F


def cross_entropy_reference(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, softcap=None, z_loss=0.0, mask=None):
    """``F.cross_entropy`` on float64 inputs with the class dimension last, plus softcap and z-loss.

    Differentiable w.r.t. ``logits``. Rows that are not counted have their logits replaced by zeros
    first (they contribute nothing either way; this keeps inf/NaN there out of the reference). With no
    counted row the mean is 0, persample's documented choice. The z-loss terms ``z_loss * lse**2`` of the
    counted rows are added to each row (``"none"``), summed (``"sum"``), or averaged over the counted rows
    (``"mean"``, unweighted, next to ``F.cross_entropy``'s weighted mean).
    """
    V = logits.shape[-1]
    if mask is not None:
        target = torch.where(mask, target, ignore_index)
    x = logits.double().reshape(-1, V)
    t = target.reshape(-1).long()
    counted = t != ignore_index
    x = torch.where(counted[:, None], x, torch.zeros_like(x))
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    w = weight.double() if weight is not None else None
    ce_rows = F.cross_entropy(x, t, weight=w, ignore_index=ignore_index, reduction="none",
                              label_smoothing=label_smoothing)
    z_rows = z_loss * torch.logsumexp(x, -1) ** 2 * counted
    if reduction == "none":
        return (ce_rows + z_rows).reshape(target.shape)
    if reduction == "sum":
        return ce_rows.sum() + z_rows.sum()
    w_t = w[torch.where(counted, t, 0)] if w is not None else torch.ones_like(ce_rows)
    denom = (w_t * counted).sum()
    if denom > 0:
        # The weighted mean straight from PyTorch, so that its convention is what we test against.
        ce = F.cross_entropy(x, t, weight=w, ignore_index=ignore_index, reduction="mean",
                             label_smoothing=label_smoothing)
    else:
        ce = ce_rows.sum() * 0.0
    count = counted.sum()
    return ce + (z_rows.sum() / count if count > 0 else z_rows.sum() * 0.0)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (the absolute norm when ref is 0). NaN fails the assert here."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not torch.isnan(out).any(), "NaN in output"
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff
