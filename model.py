"""The model of NCL-CIR (Gao et al., ICASSP 2025): CLIP (Radford et al., 2021) from scratch, with
three Weight Compensation Blocks (wcb.py). Its inputs (tokens, transformed images): preprocess.py.
  0. CIRModel   q = normalize(f_txt + f_ref), t = normalize(f_tar), each f a WCB-compensated feature
  1. towers     ViT, ModifiedResNet, causal text transformer (batch-first, fp32 LayerNorm)
  2. CLIP       encode_image / encode_text (= OpenAI's) and the token outputs the WCB re-weights
  3. loading    build_clip (from an OpenAI state dict), load_clip (released name, path, tiny config)
Parameter names and shapes are OpenAI's: their checkpoints load here unchanged, ours in their code.
"""

import math
import warnings
from collections import OrderedDict
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import util
from preprocess import make_transform
from wcb import WCB

# ------------------------------------------------------------------------------------------------
# 0. The composed model of NCL-CIR

def compose(f_txt, f_ref):
    """The composed query q = normalize(f_txt + f_ref) (CLIP4Cir, SPN): (B, D) -> (B, D)."""
    return F.normalize(f_txt + f_ref, dim=-1)

class CIRModel(nn.Module):
    """q = normalize(f_txt + f_ref), t = normalize(f_tar), each f a WCB-compensated CLIP feature:
    T*_mod = T_mod ⊗ Att_mod, I*_ref = I_ref ⊗ Att_ref, I*_tar = I_tar ⊗ Att_tar (wcb.py).
    wcb=False: every f is CLIP's global token, the element-wise-sum baseline (CLIP4Cir's first
    stage). The reference and target heads read the same image tokens: a gallery is encoded once."""
    def __init__(self, clip, wcb=True, n_maps=2, wcb_hidden=0):
        super().__init__()
        self.clip = clip
        clip.logit_scale.requires_grad_(False)      # τ is fixed (--tau): CLIP's own is unused
        heads = [WCB(clip.embed_dim, n_maps, wcb_hidden) if wcb else None for _ in range(3)]
        self.wcb_txt, self.wcb_ref, self.wcb_tar = heads

    def forward(self, tokens, ref, tgt=None):
        """tokens (B, L); ref, tgt: images (B, 3, H, W), one tower pass for both; or Tokens, a
        frozen tower's (B, 1+m, D); ref may be Features, f_ref (B, D) (SPN stage 2: tgt None).
        -> q (B, D), t (B, D) or None, and the summed diversity penalty of the heads used."""
        if isinstance(ref, torch.Tensor):                          # images: through the tower
            tok = self.image_tokens(ref if tgt is None else torch.cat([ref, tgt]))  # (B|2B, 1+m, D)
            ref, tgt = map(Tokens, tok.chunk(2)) if tgt is not None else (Tokens(tok), None)
        f_txt, pen = self.text_features(tokens)
        f_ref = ref.f
        if isinstance(ref, Tokens):
            f_ref, pen_ref = self.image_features(ref.f, "ref")
            pen = pen + pen_ref
        q, t = compose(f_txt, f_ref), None
        if tgt is not None:
            f_tar, pen_tar = self.image_features(tgt.f, "tar")
            t, pen = F.normalize(f_tar, dim=-1), pen + pen_tar
        return q, t, pen

    def text_features(self, tokens):
        """tokens (B, L) -> f_txt (B, D), diversity penalty. T*_mod = T_mod ⊗ Att_mod."""
        x, mask, eot = self.clip.encode_text_tokens(tokens)         # (B, L', D), (B, L'), (B,)
        g = x[torch.arange(len(x), device=x.device), eot]          # (B, D) CLIP's text feature
        return (g, g.new_zeros(())) if self.wcb_txt is None else self.wcb_txt(x, mask, g)[:2]

    def image_tokens(self, images):
        """(B, 3, H, W) -> (B, 1+m, D), token 0 = global. Each distinct image goes through the tower
        once (a group batch repeats its reference), unless BatchNorm in training sees the batch."""
        batch_norm = self.training and isinstance(self.clip.visual, ModifiedResNet)
        once, rows = (images, None) if batch_norm else distinct(images)  # (U, 3, H, W), (B,)|None
        tok = self.clip.encode_image_tokens(once)                   # (U, 1+m, D)
        return tok if rows is None else tok[rows]

    def image_features(self, tokens, role):
        """Image tokens (B, 1+m, D) -> f (B, D), penalty. I*_r = I_r ⊗ Att_r, r = role."""
        head = self.wcb_ref if role == "ref" else self.wcb_tar
        x = tokens.to(self.clip.dtype)
        return (x[:, 0], x.new_zeros(())) if head is None else head(x, None, x[:, 0])[:2]

class Tokens(NamedTuple):
    """A frozen image tower's output tokens (B, 1+m, D) (--encoder text: computed once)."""
    f: torch.Tensor

class Features(NamedTuple):
    """Image features (B, D) computed once by a frozen image side (SPN stage 2's f_ref)."""
    f: torch.Tensor

def distinct(x):
    """x (N, ...) -> (u (U, ...), rows (N,)) with u[rows] == x exactly, or (x, None) if no repeats;
    rows match by a checksum of their float32 bits, then by value (a collision costs the reuse)."""
    if x.dtype != torch.float32 or len(x) < 2:
        return x, None
    bits = x.flatten(1).contiguous().view(torch.int32)                  # (N, P) exact bit patterns
    weights = torch.arange(1, bits.shape[1] + 1, device=x.device, dtype=torch.int32) * 40503 | 1
    _, rows = (bits * weights).sum(1).unique(return_inverse=True)       # (N,) int32 products wrap
    first = torch.full((int(rows.max()) + 1,), len(x), device=x.device)   # (U,) first row of each
    first = first.scatter_reduce(0, rows, torch.arange(len(x), device=x.device), "amin")
    if len(first) == len(x) or not torch.equal(x[first][rows], x):
        return x, None
    return x[first], rows

# ------------------------------------------------------------------------------------------------
# 1. The towers

class LayerNorm(nn.LayerNorm):
    """LayerNorm in fp32 whatever the input dtype (OpenAI's fp16 checkpoints need it)."""
    def forward(self, x):
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)

class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation CLIP was trained with (exact GELU differs)."""
    def forward(self, x):
        if torch.is_grad_enabled():                # autograd saves sigmoid's output: not in place
            return x * torch.sigmoid(1.702 * x)
        return torch.sigmoid(1.702 * x).mul_(x)    # inference: one (B, L, 4W) temporary less

def _heads(x, n):                                          # (B, L, C) -> (B, n, L, C // n)
    return x.unflatten(-1, (n, -1)).transpose(1, 2)

class Attention(nn.Module):
    """Multi-head self-attention, batch-first, with nn.MultiheadAttention's parameter names."""
    def __init__(self, width, heads, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)       # nn.MultiheadAttention's default init
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x):                                  # (B, L, W) -> (B, L, W)
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (_heads(t, self.heads) for t in (q, k, v))                # (B, h, L, W/h)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, h, L, W/h)
        return self.out_proj(y.transpose(1, 2).flatten(2))

class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, causal=False):
        super().__init__()
        self.attn = Attention(width, heads, causal)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(),
                                             c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = LayerNorm(width)

    def forward(self, x):                                  # pre-norm residual block, (B, L, W)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

class Transformer(nn.Module):
    def __init__(self, width, layers, heads, causal=False):
        super().__init__()
        self.width, self.layers = width, layers
        blocks = [ResidualAttentionBlock(width, heads, causal) for _ in range(layers)]
        self.resblocks = nn.Sequential(*blocks)
        self.grad_checkpoint = False                       # set_grad_checkpoint

    def forward(self, x):                                  # (B, L, W)
        return run_blocks(self.resblocks, x, self.grad_checkpoint)

def run_blocks(blocks, x, grad_checkpoint=False):
    """x through each residual block. grad_checkpoint (--grad-checkpoint): a block keeps only its
    input for the backward and runs again there (Chen et al. 2016): the activations of one block
    instead of all, for one more forward; a recomputed BatchNorm leaves its running statistics."""
    for block in blocks:
        if grad_checkpoint and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False,
                           context_fn=lambda b=block: (nullcontext(), running_stats_kept(b)))
        else:
            x = block(x)
    return x

@contextmanager
def running_stats_kept(module):
    """module's BatchNorm layers normalise by their batch as always, but leave their running
    statistics as they were: samples seen twice (a recomputed block; --micro-batch's graph-free
    first pass) are counted once. momentum 0: running = 1 · running + 0 · batch, exactly."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, n) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(n)

def set_grad_checkpoint(module, on=True):
    """--grad-checkpoint: activation checkpointing of every residual block of the towers in module
    (ViT and text transformer blocks, ResNet bottlenecks); results and gradients are unchanged."""
    for m in module.modules():
        if isinstance(m, (Transformer, ModifiedResNet)):
            m.grad_checkpoint = on

class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)  # patches
        scale, n_pos = width ** -0.5, (input_resolution // patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(n_pos, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x, all_tokens=False):               # (B, 3, H, W) -> (B, D) or (B, 1+m, D)
        x = self.conv1(x).flatten(2).transpose(1, 2)       # (B, m, W) one token per patch
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)           # (B, 1, W)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        x = self.transformer(x)                            # (B, 1+m, W)
        g = self.ln_post(x[:, 0]) @ self.proj              # (B, D) class token, reused as token 0
        return torch.cat([g[:, None], self.ln_post(x[:, 1:]) @ self.proj], 1) if all_tokens else g

class Bottleneck(nn.Module):
    """ResNet bottleneck; a stride-s block average-pools (anti-aliasing) instead of striding."""
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()   # no parameters
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:           # (pool, then) 1x1 conv to the out shape
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):                                  # (B, C, H, W) -> (B, 4 planes, H/s, W/s)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.avgpool(F.relu(self.bn2(self.conv2(out)), inplace=True))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(self.avgpool(x))  # in place
        return F.relu(out, inplace=True)

class AttentionPool2d(nn.Module):
    """Attention pooling: the mean feature (token 0) attends over all positions; with every position
    as a query too, one token per position: the image tokens `I = {I^cls, I^1..I^m}` of the WCB."""
    def __init__(self, spacial_dim, embed_dim, num_heads, output_dim):
        super().__init__()
        pos = torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5   # (1+hw, C)
        self.positional_embedding = nn.Parameter(pos)
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(embed_dim, embed_dim) for _ in range(3))
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x, all_tokens=False):               # (B, C, h, w) -> (B, D) or (B, 1+hw, D)
        x = x.flatten(2).transpose(1, 2)                   # (B, hw, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)                    # (B, 1+hw, C)
        x = x + self.positional_embedding.to(x.dtype)
        k, v = _heads(self.k_proj(x), self.num_heads), _heads(self.v_proj(x), self.num_heads)
        def pool(queries):                                 # (B, n, C) -> (B, n, D)
            y = F.scaled_dot_product_attention(_heads(self.q_proj(queries), self.num_heads), k, v)
            return self.c_proj(y.transpose(1, 2).flatten(2))
        g = pool(x[:, :1])                                 # (B, 1, D) the usual global feature
        return torch.cat([g, pool(x[:, 1:])], dim=1) if all_tokens else g[:, 0]

class ModifiedResNet(nn.Module):
    """ResNet with a 3-conv stem + average pool, anti-aliased strided blocks, attention pooling."""
    def __init__(self, layers, output_dim, heads, input_resolution=224, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        for i, n in enumerate(layers):     # layer1..4: width * (1, 2, 4, 8) planes in, 4x that out
            planes = width * 2 ** i
            blocks = [Bottleneck(planes * 2 if i else width, planes, stride=2 if i else 1)]
            blocks += [Bottleneck(planes * 4, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)
        self.grad_checkpoint = False                       # set_grad_checkpoint

    def forward(self, x, all_tokens=False):               # (B, 3, H, W) -> (B, D) or (B, 1+hw, D)
        x = x.contiguous(memory_format=torch.channels_last)   # NHWC convs: ~10% faster on CPU
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)), inplace=True)
        x = F.avg_pool2d(x, 2)                             # (B, width, H/4, W/4)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = run_blocks(layer, x, self.grad_checkpoint)  # -> (B, 32 width, H/32, W/32)
        return self.attnpool(x, all_tokens)

# ------------------------------------------------------------------------------------------------
# 2. CLIP

class CLIP(nn.Module):
    """OpenAI's CLIP, same constructor: vision_layers a 4-tuple -> ModifiedResNet, an int -> ViT."""
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width,
                 vision_patch_size, context_length, vocab_size, transformer_width,
                 transformer_heads, transformer_layers):
        super().__init__()
        self.embed_dim, self.image_resolution = embed_dim, image_resolution
        self.context_length, self.vocab_size = context_length, vocab_size
        if isinstance(vision_layers, (tuple, list)):       # 64-dim heads as OpenAI (>= 1: tiny)
            self.visual = ModifiedResNet(vision_layers, embed_dim, max(1, vision_width * 32 // 64),
                                         image_resolution, vision_width)
        else:
            self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width,
                                            vision_layers, max(1, vision_width // 64), embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads,
                                       causal=True)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation (what training from scratch on the toy benchmark starts from)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=pool.c_proj.in_features ** -0.5)
            for name, p in self.visual.named_parameters():  # each residual branch starts at zero
                if name.startswith("layer") and name.endswith("bn3.weight"):
                    nn.init.zeros_(p)
        width, layers = self.transformer.width, self.transformer.layers
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    dtype = property(lambda self: self.visual.conv1.weight.dtype)

    def encode_image(self, images):                        # (B, 3, H, W) -> (B, D)
        return self.visual(images.to(self.dtype))

    def encode_image_tokens(self, images):                 # (B, 3, H, W) -> (B, 1+m, D), 0 = global
        return self.visual(images.to(self.dtype), all_tokens=True)

    def _text_trunk(self, text):                           # (B, L) -> (B, L', W) pre-ln_final, (B,)
        eot = text.argmax(dim=-1)                          # EOT has the largest id (OpenAI's pick)
        n = int(eot.max()) + 1                             # causal: later tokens change no output
        x = self.token_embedding(text[:, :n]).to(self.dtype)
        return self.transformer(x + self.positional_embedding[:n].to(self.dtype)), eot

    def encode_text(self, text):                           # (B, L) -> (B, D) the EOT's feature
        x, eot = self._text_trunk(text)
        return self.ln_final(x[torch.arange(len(x), device=x.device), eot]) @ self.text_projection

    def encode_text_tokens(self, text):
        """(B, L) -> x (B, L', D) every token after ln_final and text_projection, mask (B, L') True
        through EOT, eot (B,); L' = the batch's last EOT + 1, x[arange(B), eot] == encode_text."""
        x, eot = self._text_trunk(text)
        rows = torch.arange(len(x), device=x.device)
        tokens = self.ln_final(x) @ self.text_projection   # (B, L', D)
        tokens[rows, eot] = self.ln_final(x[rows, eot]) @ self.text_projection  # encode_text's bits
        mask = torch.arange(x.shape[1], device=x.device) <= eot[:, None]        # (B, L')
        return tokens, mask, eot

    def forward(self, image, text):                        # -> logits (B_img, B_txt) and transpose
        img = F.normalize(self.encode_image(image), dim=-1)
        txt = F.normalize(self.encode_text(text), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()

# ------------------------------------------------------------------------------------------------
# 3. Loading

_SHA256 = {  # a released model -> its file's SHA-256, which is also the folder in its URL
    "RN50": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
    "RN101": "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
    "RN50x4": "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
    "RN50x16": "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
    "RN50x64": "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c",
    "ViT-B/32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    "ViT-B/16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    "ViT-L/14": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
    "ViT-L/14@336px": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
}
MODEL_URLS = {  # name -> URL, e.g. .../{sha}/ViT-L-14-336px.pt (tests point names at file:// URLs)
    name: f"https://openaipublic.azureedge.net/clip/models/{sha}/"
          f"{name.replace('/', '-').replace('@', '-')}.pt" for name, sha in _SHA256.items()}
_TEXT = dict(context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
             transformer_layers=4)
_TINY_VIT = dict(embed_dim=128, image_resolution=48, vision_layers=4, vision_patch_size=16, **_TEXT)
TINY_CONFIGS = {  # random init, to train from scratch on the toy benchmark (heads = width // 64)
    # 48 px in 16-px patches: 3 x 3 patches, one per cell of the toy's scene grid (64 px, resized)
    "tiny": dict(_TINY_VIT, vision_width=192),
    "tiny-s": dict(_TINY_VIT, vision_width=128),          # cheaper images: the noise study's grid
    "tiny-rn": dict(_TEXT, embed_dim=128, image_resolution=64, vision_layers=(1, 1, 1, 1),
                    vision_width=16, vision_patch_size=None),
}
_ARCHIVE_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # TorchScript attributes

def available_models():
    return [*MODEL_URLS, *TINY_CONFIGS]

def infer_config(state_dict):
    """OpenAI-format state dict -> CLIP constructor kwargs, from key names and shapes (as OpenAI's
    build_model; head counts are not stored: width // 64). Works on shape-only (meta) tensors."""
    sd, vit = state_dict, "visual.proj" in state_dict
    need = ["text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight",
            *(["visual.conv1.weight", "visual.positional_embedding"] if vit else
              ["visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding"])]
    if missing := [k for k in need if k not in sd]:
        raise ValueError(f"not a CLIP state dict: missing keys {missing}")
    width = sd["ln_final.weight"].shape[0]
    blocks = {k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}
    cfg = dict(embed_dim=sd["text_projection"].shape[1], transformer_width=width,
               context_length=sd["positional_embedding"].shape[0], transformer_heads=width // 64,
               vocab_size=sd["token_embedding.weight"].shape[0], transformer_layers=len(blocks))
    if vit:
        conv = sd["visual.conv1.weight"]                   # (width, 3, patch, patch)
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = sum(k.startswith("visual.") and k.endswith(".attn.in_proj_weight") for k in sd)
        return dict(cfg, image_resolution=conv.shape[-1] * grid, vision_layers=layers,
                    vision_width=conv.shape[0], vision_patch_size=conv.shape[-1])
    n_pos = sd["visual.attnpool.positional_embedding"].shape[0]
    if (grid := round((n_pos - 1) ** 0.5)) ** 2 + 1 != n_pos:
        raise ValueError(f"visual.attnpool.positional_embedding has {n_pos} rows, "
                         f"not a square grid + 1")
    layers = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")})
                   for b in (1, 2, 3, 4))
    return dict(cfg, image_resolution=grid * 32, vision_layers=layers,
                vision_width=sd["visual.layer1.0.conv1.weight"].shape[0], vision_patch_size=None)

def build_clip(state_dict):
    """OpenAI-format state dict -> CLIP in fp32, eval mode. Built on the meta device and filled with
    copies of the weights: no random init is wasted, and no memory is shared with state_dict."""
    sd = {k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True)
          for k, v in state_dict.items() if k not in _ARCHIVE_EXTRAS}
    with torch.device("meta"):
        model = CLIP(**infer_config(sd))
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        few = ", ".join(f"{len(keys)} {what} {keys[:10]}{' ...' if len(keys) > 10 else ''}"
                        for what, keys in (("missing keys", missing), ("unexpected", unexpected)))
        raise ValueError(f"state dict does not fit the inferred CLIP architecture: {few}")
    return model.eval()

def _read_state_dict(path):
    """TorchScript archive (released) or state dict (maybe under 'state_dict' / 'model') -> dict."""
    # jit is deprecated (a FutureWarning), but OpenAI's releases are TorchScript archives
    with suppress(Exception), warnings.catch_warnings(action="ignore", category=FutureWarning):
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"neither a TorchScript archive nor a state dict torch.load can read "
                         f"({type(e).__name__}); expected an OpenAI CLIP .pt file or a saved CLIP "
                         f"state_dict") from None
    if isinstance(sd, dict):                               # training checkpoints wrap the weights
        sd = next((sd[k] for k in ("state_dict", "model") if isinstance(sd.get(k), dict)), sd)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"holds a {type(sd).__name__}, expected a CLIP state dict (parameter "
                         f"name -> tensor), possibly under 'state_dict' or 'model'")
    return sd

def load_clip(name_or_path, device=None, download_root=None):
    """A released name (downloaded to ~/.cache/clip or download_root), a tiny config name (random
    init) or a path -> (model in fp32, eval mode, on device; preprocess transform for its size)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = str(name_or_path)
    if name in TINY_CONFIGS:
        model = CLIP(**TINY_CONFIGS[name]).eval()
    elif name not in MODEL_URLS and not Path(name).is_file():
        raise ValueError(f"unknown CLIP model {name!r} (no such file either); available models: "
                         f"{', '.join(available_models())}")
    else:
        root = download_root or "~/.cache/clip"
        path = util.download(MODEL_URLS[name], root) if name in MODEL_URLS else Path(name)
        try:
            model = build_clip(_read_state_dict(path))
        except ValueError as e:                            # say which file
            raise ValueError(f"{path}: {e}") from None
    return model.to(device), make_transform("clip", model.image_resolution)
