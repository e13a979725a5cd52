"""The composed-retrieval model of NCL-CIR: CLIP (model.py) with three WCB heads (wcb.py),
q = normalize(f_txt + f_ref) for a query and t = normalize(f_tar) for a candidate target (README: "What follows the
paper", row "query / target").
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from wcb import WCB


class CIRModel(nn.Module):
    """q = normalize(f_txt + f_ref), t = normalize(f_tar), each f a WCB-compensated CLIP feature.

    With wcb=False every f is the plain CLIP global token, i.e. the CLIP element-wise-sum baseline
    (CLIP4Cir's first stage). The image tower runs once per image; the reference head and the target head
    read the same tokens, so a gallery is encoded once for both roles."""

    def __init__(self, clip, wcb=True, n_maps=2, wcb_hidden=0):
        super().__init__()
        self.clip = clip
        clip.logit_scale.requires_grad_(False)      # τ is fixed (--tau); CLIP's learned scale is unused here
        d = clip.embed_dim
        heads = [WCB(d, n_maps, wcb_hidden) if wcb else None for _ in range(3)]
        self.wcb_txt, self.wcb_ref, self.wcb_tar = heads

    @staticmethod
    def _head(wcb, x, mask, g):
        if wcb is None:
            return g, g.new_zeros(())
        f, penalty, _ = wcb(x, mask, g)
        return f, penalty

    def text_features(self, tokens):
        """tokens (B, L) -> f_txt (B, D), diversity penalty. T*_mod = T_mod ⊗ Att_mod."""
        x, mask, eot = self.clip.encode_text_tokens(tokens)               # (B, L', D), (B, L'), (B,)
        g = x[torch.arange(len(x), device=x.device), eot]                # (B, D) the usual CLIP text feature
        return self._head(self.wcb_txt, x, mask, g)

    def image_tokens(self, images):
        return self.clip.encode_image_tokens(images)                      # (B, 1+m, D), token 0 = global

    def image_features(self, tokens, role):
        """Image tokens (B, 1+m, D) -> f (B, D), penalty. role 'ref': I*_ref = I_ref ⊗ Att_ref; 'tar' likewise."""
        head = self.wcb_ref if role == "ref" else self.wcb_tar
        tokens = tokens.to(self.clip.dtype)
        return self._head(head, tokens, None, tokens[:, 0])

    def forward(self, tokens, ref_images=None, tgt_images=None, ref_tokens=None, tgt_tokens=None, ref_feats=None):
        """One training step's features. Images go through the tower in one concatenated pass; cached tokens
        (image side frozen) or cached reference features (SPN stage 2) skip it.
        Returns q (B, D), t (B, D) or None, and the summed diversity penalty of the heads used."""
        if ref_images is not None:
            both = self.image_tokens(torch.cat([ref_images, tgt_images]))    # (2B, 1+m, D)
            ref_tokens, tgt_tokens = both.chunk(2)
        f_txt, pen = self.text_features(tokens)
        if ref_feats is None:
            ref_feats, pen_ref = self.image_features(ref_tokens, "ref")
            pen = pen + pen_ref
        q = F.normalize(f_txt + ref_feats, dim=-1)
        t = None
        if tgt_tokens is not None:
            f_tar, pen_tar = self.image_features(tgt_tokens, "tar")
            t, pen = F.normalize(f_tar, dim=-1), pen + pen_tar
        return q, t, pen
