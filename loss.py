"""Contrastive losses of NCL-CIR (Gao et al., ICASSP 2025) and SPN (Feng, Zhang, Nie, ACM MM 2024).

B queries q_i = normalize(f_txt + f_ref), M targets t_j, all L2-normalised (model.CIRModel); logits
s_ij = q_i t_j / tau, p_ij = softmax_j(s_ij); pos_i is the column of i's own target (i in a batch):

    l_i         = -log p_{i,pos_i}                     the per-pair loss
    L_NCE       = (1/B) sum_i l_i                      CLIP4Cir, SPN stage 1                info_nce
    L^soft_NCE  = (1/B) sum_i -sum_j y_ij log p_ij, soft labels y from the NFB's w_i:
      weight      y_{i,pos_i} = w_i, 0 elsewhere: (1/B) sum_i w_i l_i                       soft_nce
      complement  w_i l_i + (1 - w_i) c_i,  c_i = -sum_{j != pos_i} log(1 - p_ij)           soft_nce
      sample      pair i in an epoch with probability w_i, trained with L_NCE (default)     train.py
    L_bank      = the same against a bank of every training target (SPN stage 2)         batch_loss
    l^gallery_i = l_i over the training gallery (the NFB's query view)                   gallery_nce
    l^text_i    = the pair's own text among all training texts (the NFB's text view)        text_nce

complement: a flagged pair teaches only what its query is not (complementary labels, RCL, Hu et al.
TPAMI 2023); c_i pulls the positive's logit with force p_{i,pos_i} sum_j p_ij / (1 - p_ij), l_i with
1 - p_{i,pos_i}: a far, wrong positive is hardly pulled. sample: weight in expectation, full batch.
w = 1 gives L_NCE in every form. The paper gives no equation: the forms are ours (docs/results.md).
"""

import torch
import torch.nn.functional as F

SOFT_FORMS = ("weight", "complement")   # soft_nce's forms; train.py's --soft-label adds "sample"
CHUNK = 1024        # queries scored at once against a gallery: memory is CHUNK x gallery floats

def info_nce(q, t, tau, pos=None, reduction="mean"):
    """L_NCE. q (B, D), t (M, D) (M > B when DDP gathers all ranks' targets), pos (B,) each query's
    target column in t (default arange(B)). -> scalar, or l_i (B,) with reduction="none"."""
    logits = _logits(q, t, tau)                                          # (B, M)
    return _reduce(F.cross_entropy(logits, _pos(q, t, pos), reduction="none"), reduction)

def soft_nce(q, t, w, tau, pos=None, soft="weight", reduction="mean"):
    """L^soft_NCE of form `soft`, labels the NFB's w (B,) (no gradient); q, t, pos as info_nce."""
    if soft not in SOFT_FORMS:
        raise ValueError(f"loss.py: soft must be one of {SOFT_FORMS}, got {soft!r}")
    logp = _logits(q, t, tau).log_softmax(dim=1)                         # (B, M)
    pos = _pos(q, t, pos)
    if w.shape != pos.shape:
        raise ValueError(f"loss.py: soft labels w: shape {tuple(w.shape)}, need {tuple(pos.shape)}")
    w = w.detach().to(logp.device, torch.float32)
    loss = -w * logp.gather(1, pos[:, None]).squeeze(1)                  # (B,) w_i l_i
    if soft == "complement":                                 # log(1 - p_ij) = log(-expm1(log p_ij))
        log_not = torch.log(-torch.expm1(logp.clamp(max=-1e-6)))         # (B, M); p_ij <= 1 - 1e-6
        loss = loss + (1 - w) * -(log_not.sum(1) - log_not.gather(1, pos[:, None])[:, 0])  # c_i
    return _reduce(loss, reduction)

def similarities(q, g):
    """Cosine similarities of queries against a gallery, in fp32: q (C, D), g (G, D) -> (C, G)."""
    return F.normalize(q.float(), dim=-1) @ F.normalize(g.float(), dim=-1).T

def drop_reference(sims, ref, keep=None):
    """The reference removal of CIRR's and Shoes' protocols and the NFB's query view: column ref
    (C,) of sims (C, G) set to -inf in place, unless it equals keep (C,) (a self-pair). -> sims."""
    ref = ref.to(sims.device)
    drop = (ref >= 0) if keep is None else (ref >= 0) & (ref != keep.to(sims.device))   # (C,)
    sims[drop, ref[drop]] = float("-inf")
    return sims

def rank_of(sims, idx):
    """0-based rank of column idx[i] in row i of sims (C, G) under a stable descending sort (ties:
    lower index first) -> (C,) long. Counting beats sorting: O(C x G), no (C, G) index tensor."""
    s = sims.gather(1, idx[:, None])                                     # (C, 1) score of the item
    cols = torch.arange(sims.shape[1], device=sims.device)[None]         # (1, G)
    return ((sims > s) | ((sims == s) & (cols < idx[:, None]))).sum(1)   # count those ranked before

@torch.no_grad()
def gallery_nce(q, gallery, tgt, tau, exclude=None, chunk=CHUNK):
    """l^gallery_i: j over the gallery minus i's reference (exclude (Q,); kept if the target): a
    near-miss (same subset, wrong text on a true edit) rarely meets the true target in a batch, but
    always in the gallery. q (Q, D), gallery (G, D) normalised, tgt (Q,) -> (Q,) fp32 in chunks."""
    out = []
    for s in range(0, len(q), chunk):
        logits = _logits(q[s:s + chunk], gallery, tau)                   # (C, G)
        t = tgt[s:s + chunk].to(logits.device)
        if exclude is not None:                                  # a self-pair keeps its target
            drop_reference(logits, exclude[s:s + chunk], keep=t)
        out.append(-logits.log_softmax(1).gather(1, t[:, None]).squeeze(1))
    return torch.cat(out)

@torch.no_grad()
def text_nce(f_txt, f_ref, t, text_idx, tau, chunk=CHUNK):
    """l^text_i: which text explains pair i? s_ki = normalize(f_txt_k + f_ref_i) t_i / tau, each
    text's scores normalised over the pairs (inverted softmax: a hub, high on every pair, must not
    win everywhere), then the texts compete, so a wrong text on a true edit loses to the pair's own:
        l^text_i = -log softmax_k( s_ki - log sum_j exp(s_kj) )  at i's own text.
    f_txt (U, D), f_ref (n, D) unnormalised, t (n, D) normalised, text_idx (n,) -> (n,) fp32. Memory
    O(U x chunk), no U x n x D: cos = (f_txt_k t_i + f_ref_i t_i) / |f_txt_k + f_ref_i| expanded."""
    with torch.autocast(f_txt.device.type, enabled=False):
        f_txt, f_ref, t = f_txt.float(), f_ref.float(), t.float()
        n_txt = (f_txt * f_txt).sum(1)[:, None]                          # (U, 1) |f_txt_k|^2
        def scores(s):                                                   # (U, C) s_ki, one chunk
            r, tc = f_ref[s:s + chunk], t[s:s + chunk]                   # (C, D)
            num = f_txt @ tc.T + (r * tc).sum(1)                         # f_txt_k t_i + f_ref_i t_i
            norm2 = n_txt + (r * r).sum(1) + 2 * f_txt @ r.T             # |f_txt_k + f_ref_i|^2
            return num / norm2.clamp_min(1e-12).sqrt() / tau
        starts = range(0, len(f_ref), chunk)
        hub = torch.full((len(f_txt),), float("-inf"), device=f_txt.device)
        for s in starts:                                                 # (U,) log sum_j exp(s_kj)
            hub = torch.logaddexp(hub, scores(s).logsumexp(1))
        out = []
        for s in starts:
            logp = (scores(s) - hub[:, None]).log_softmax(0)             # (U, C) over the texts
            out.append(-logp.gather(0, text_idx[s:s + chunk].to(f_txt.device)[None]).squeeze(0))
    return torch.cat(out)

# -----------------------------------------------------------------------------
# helpers

def _logits(q, t, tau):
    """q (B, D), t (M, D) -> (B, M) fp32 logits: at tau = 0.01 bf16 errs by ~0.1 > the NFB gaps."""
    if q.dim() != 2 or t.dim() != 2 or q.shape[1] != t.shape[1]:
        raise ValueError(f"loss.py: q {tuple(q.shape)}, t {tuple(t.shape)}; need (B, D) and (M, D)")
    with torch.autocast(q.device.type, enabled=False):
        return q.float() @ t.float().T / tau

def _pos(q, t, pos):
    B = q.shape[0]
    if pos is None and t.shape[0] < B:
        raise ValueError(f"loss.py: {t.shape[0]} targets for {B} queries; pass pos= (each query's "
                         "target column) unless the targets are the batch's own, in order")
    if pos is not None and pos.shape != (B,):
        raise ValueError(f"loss.py: pos must have shape ({B},), got {tuple(pos.shape)}")
    return torch.arange(B, device=q.device) if pos is None else pos.to(q.device)

def _reduce(loss, reduction):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"loss.py: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return loss if reduction == "none" else getattr(loss, reduction)()
