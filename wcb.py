"""Weight Compensation Block (WCB) of NCL-CIR (Gao et al., ICASSP 2025, arXiv 2504.04339).

The paper down-weights irrelevant words and patches by re-weighting CLIP tokens with weight maps:
    T*_mod = T_mod ⊗ Att_mod      (modification text: sot, words, eot)
    I*_ref = I_ref ⊗ Att_ref      (reference image: cls + patches)
    I*_tar = I_tar ⊗ Att_tar      (target image:    cls + patches)
and asks for "diverse weight maps" with no formula for Att; ours (README: "What follows the paper"):
    A_k = softmax_over_tokens(score_k(X))    K >= 2 maps, padding gets exactly zero weight
    penalty = ||Â Âᵀ - I||²_F,  Â_k = A_k / ||A_k||_2   (Lin et al. 2017's regulariser)
    Att = mean_k A_k,  X* = X ⊗ Att,  f = g + α · Σ_n X*_n
with g the global token (cls / eot), α a learned scalar initialised to 0: at step 0 the block is
the identity on g, the composed model exactly CLIP. model.CIRModel makes three (text, ref, target).
"""

import torch
import torch.nn as nn

def diversity_penalty(a):
    """||Â Âᵀ - I||²_F of row-L2-normalised maps, batch mean. a (B, K, N) -> scalar (fp32).
    diag(Â Âᵀ) = 1, so we sum only the off-diagonal cosines (same value, minus rounding):
    disjoint maps cost exactly 0, identical maps K(K-1)."""
    a = a.float() / a.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)   # (B, K, N) Â
    # elementwise product + sum instead of a bmm: stays fp32 under autocast, and K is tiny
    gram = (a[:, :, None, :] * a[:, None, :, :]).sum(-1)                 # (B, K, K)
    off = 1 - torch.eye(a.shape[1], device=a.device)                    # (K, K) off-diagonal
    return ((gram * off) ** 2).sum((1, 2)).mean()

class WCB(nn.Module):
    """hidden=0 -> linear scorer, else a 1-hidden-layer tanh MLP (as Lin et al.)."""
    def __init__(self, dim, n_maps=2, hidden=0):
        super().__init__()
        if n_maps < 2:
            raise ValueError(f"wcb.py: n_maps={n_maps}; "
                             f"the diversity penalty needs at least 2 weight maps")
        # random (default) init matters: identical maps get identical gradients, never diverge
        self.score = (nn.Linear(dim, n_maps) if hidden == 0 else
                      nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, n_maps)))
        self.alpha = nn.Parameter(torch.zeros(()))   # 0 -> f == g at initialisation

    def forward(self, x, mask, g):
        """x (B, N, D) tokens, mask (B, N) bool True = valid (or None), g (B, D) global token.
        -> f (B, D) compensated feature, penalty (scalar, fp32), att (B, N) fp32 mean map."""
        if x.dim() != 3 or g.shape != (x.shape[0], x.shape[2]):
            raise ValueError(f"wcb.py: expected x (B, N, D) and g (B, D), "
                             f"got {tuple(x.shape)} and {tuple(g.shape)}")
        s = self.score(x).float()                                        # (B, N, K) fp32 softmax
        if mask is not None:
            # finfo.min, not -inf: padding underflows to exactly 0, and an all-padding row (which
            # model.py never makes) gives a uniform map instead of NaN
            s = s.masked_fill(~mask[:, :, None], torch.finfo(s.dtype).min)
        a = s.softmax(dim=1).transpose(1, 2)                             # (B, K, N) A_k, sum 1
        att = a.mean(1)                                                  # (B, N) Att = mean_k A_k
        # Σ_n X*_n = Σ_n Att_n X_n  (X* = X ⊗ Att, summed over tokens), as one batched matmul
        pooled = (att[:, None, :].to(x.dtype) @ x).squeeze(1)            # (B, D)
        return g + self.alpha * pooled, diversity_penalty(a), att
