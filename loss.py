"""Contrastive losses: InfoNCE, NCL-CIR's soft-label NCE, and SPN's static-bank NCE.

- info_nce: in-batch InfoNCE of composed retrieval: query i = (reference image, text), its positive is target i,
  every other target of the batch is a negative (CLIP4Cir, SPN stage 1).
- soft_nce: L^soft_NCE of NCL-CIR (Gao et al., ICASSP 2025). The noise-pair filter (nfb.py) gives each pair a
  clean probability w_i; the target distribution puts w_i on the paired target and (1 - w_i)/(M - 1) on each
  other target, so a pair flagged noisy (w -> 0) no longer pulls its query towards its (wrong) target.
  w = 1 is exactly InfoNCE. The paper does not give the form; soft="weight" (w_i · InfoNCE_i) is the ablation.
- bank_nce: SPN's stage 2 "more negatives" (Feng et al., ACM MM 2024): NCE of each query over a static bank of
  the target features of every training image; the soft labels of the NFB carry over (spread over the bank).

q and t are L2-normalised by the model. Logits q tᵀ / tau are computed in fp32 with autocast off: at tau = 0.01
a bf16 logit is off by up to ~0.1, which is larger than the loss differences the GMM has to separate.
Every loss takes reduction="mean" | "sum" | "none"; "none" gives the per-sample losses the noise filter fits.
"""

import torch
import torch.nn.functional as F


def _logits(q, t, tau):
    """q (B, D), t (M, D) -> (B, M) fp32 logits, autocast disabled."""
    if q.dim() != 2 or t.dim() != 2 or q.shape[1] != t.shape[1]:
        raise ValueError(f"loss.py: expected q (B, D) and targets (M, D), got {tuple(q.shape)} and {tuple(t.shape)}")
    with torch.autocast(q.device.type, enabled=False):
        return q.float() @ t.float().T / tau


def _reduce(loss, reduction):
    if reduction == "none":
        return loss
    if reduction in ("mean", "sum"):
        return getattr(loss, reduction)()
    raise ValueError(f"loss.py: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _log_probs(logits, pos):
    """log p(positive) (B,) and the sum of log p over the other M - 1 targets (B,), from one log-softmax."""
    B, M = logits.shape
    if pos.shape != (B,):
        raise ValueError(f"loss.py: positive indices must have shape ({B},), got {tuple(pos.shape)}")
    logp = logits.log_softmax(dim=1)                      # (B, M)
    lp_pos = logp.gather(1, pos[:, None]).squeeze(1)      # (B,)  log p(positive)
    return lp_pos, logp.sum(1) - lp_pos                   # (B,), (B,)


SOFT_LABELS = ("spread", "weight")


def _soft(lp_pos, lp_rest, w, M, soft="spread"):
    """The soft target without building it densely. spread: -w·log p(positive) - (1 - w)/(M - 1)·Σ_other log p
    (the label mass a noisy pair loses goes to the other targets); weight: -w·log p(positive) (a flagged pair
    simply counts less, nothing pushes it elsewhere)."""
    if w.shape != lp_pos.shape:
        raise ValueError(f"loss.py: soft labels w must have shape {tuple(lp_pos.shape)}, got {tuple(w.shape)}")
    if soft not in SOFT_LABELS:
        raise ValueError(f"loss.py: soft must be one of {SOFT_LABELS}, got {soft!r}")
    w = w.detach().to(lp_pos.device, torch.float32)     # labels, not a parameter
    if soft == "weight":
        return -w * lp_pos
    return -w * lp_pos - (1 - w) / max(M - 1, 1) * lp_rest


def _nce(logits, pos, w, reduction, soft="spread"):
    """Cross-entropy of each row of logits (B, M) against target pos (B,) with weight w (B,) on it and
    (1 - w)/(M - 1) on every other column (soft="spread"); w None = hard labels."""
    if w is None:
        if pos.shape != (logits.shape[0],):
            raise ValueError(f"loss.py: positive indices must have shape ({logits.shape[0]},), got {tuple(pos.shape)}")
        return _reduce(F.cross_entropy(logits, pos, reduction="none"), reduction)
    return _reduce(_soft(*_log_probs(logits, pos), w, logits.shape[1], soft), reduction)


def _default_pos(q, t, pos):
    if pos is not None:
        return pos
    if t.shape[0] < q.shape[0]:
        raise ValueError(f"loss.py: {t.shape[0]} targets for {q.shape[0]} queries; pass pos= (index of each "
                         "query's target) when the targets are not the batch's own in order")
    return torch.arange(q.shape[0], device=q.device)


def info_nce(q, t, tau, pos=None, reduction="mean"):
    """In-batch InfoNCE. q (B, D), t (M, D) (M > B when DDP passes targets gathered from all ranks),
    pos (B,) long index of each query's target in t (default arange(B)). -> scalar or (B,)."""
    return _nce(_logits(q, t, tau), _default_pos(q, t, pos), None, reduction)


def soft_nce(q, t, w, tau, pos=None, reduction="mean", soft="spread"):
    """Soft-label NCE L^soft_NCE: target w_i on t[pos_i], (1 - w_i)/(M - 1) on every other row of t (soft="weight":
    w_i·InfoNCE_i instead). w (B,) clean probabilities from nfb.py; w = 1 gives exactly info_nce."""
    return _nce(_logits(q, t, tau), _default_pos(q, t, pos), w, reduction, soft)


def soft_and_plain_nce(q, t, w, tau, pos=None, soft="spread"):
    """Per-sample soft NCE (to train on) and plain InfoNCE (for the noise filter's GMM) from one matrix product
    and one log-softmax: InfoNCE is -log p(positive), a term soft NCE computes anyway. -> (soft (B,), plain (B,)
    detached). With t a static bank and pos its rows, the soft part equals bank_nce(..., w=w, reduction="none")."""
    logits = _logits(q, t, tau)
    lp_pos, lp_rest = _log_probs(logits, _default_pos(q, t, pos).to(q.device))
    return _soft(lp_pos, lp_rest, w, logits.shape[1], soft), -lp_pos.detach()


@torch.no_grad()
def gallery_nce(q, gallery, tgt, tau, exclude=None, chunk=1024):
    """Per-sample NCE of every query over a whole gallery, without gradients (the NFB's --nfb-losses gallery):
    l_i = -log softmax_j(q_i g_j / tau)[tgt_i], j over the gallery minus the query's own reference image
    (exclude, as CIRR's protocol; kept when it is the target). Within a batch a near-miss target (an image of the
    query's own subset) hardly ever meets the true one; over the gallery it does.
    q (Q, D), gallery (G, D) L2-normalised, tgt (Q,) and exclude (Q,) gallery rows -> (Q,) fp32."""
    out = []
    for s in range(0, len(q), chunk):
        logits = _logits(q[s:s + chunk], gallery, tau)                   # (C, G)
        t = tgt[s:s + chunk].to(logits.device)
        if exclude is not None:
            x = exclude[s:s + chunk].to(logits.device)
            x = torch.where(x == t, -1, x)                               # a self-pair keeps its target
            rows = (x >= 0).nonzero().squeeze(1)
            logits[rows, x[rows]] = float("-inf")
        out.append(-logits.log_softmax(1).gather(1, t[:, None]).squeeze(1))
    return torch.cat(out)


def bank_nce(q, bank, target_idx, tau, w=None, reduction="mean", soft="spread"):
    """SPN stage-2 NCE over a static bank. q (B, D), bank (M, D) L2-normalised target features of all training
    images, target_idx (B,) row of each query's target in the bank, w (B,) optional soft labels (the rest,
    1 - w_i, spread over the other M - 1 bank rows). Logits are (B, M): chunk the batch if M is huge."""
    return _nce(_logits(q, bank, tau), target_idx.to(q.device), w, reduction, soft)
