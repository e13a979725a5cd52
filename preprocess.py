"""What CLIP reads. Texts: OpenAI's byte-level BPE tokenizer rewritten, with its cleaning, pre-split
regex and 48,894 merges (assets/bpe_simple_vocab_16e6.txt.gz): `clip.tokenize`'s ids, id for id.
Images: OpenAI's transform, tensor for tensor, optionally after CLIP4Cir's target pad.
"""

import gzip
import hashlib
import html
from functools import lru_cache, partial
from operator import methodcaller
from pathlib import Path

import ftfy
import regex
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

VOCAB = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# words, single digits, runs of other symbols; the two special tokens and English clitics stay whole
_SPLIT = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                       r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
# byte -> printable char (BPE on str): printable latin-1 as is, the other 68 chr(256 + k); ids 0-255
_KEEP = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
_BYTE_CHARS = {**{b: chr(b) for b in _KEEP},
               **{b: chr(256 + k) for k, b in enumerate(b for b in range(256) if b not in _KEEP)}}

@lru_cache()
def load_bpe(path=VOCAB):
    """-> (encoder {subword: id}, merge ranks {(a, b): rank}, cache {piece: ids}); checks sha256."""
    if not (path := Path(path)).is_file():
        raise FileNotFoundError(f"{path}: BPE vocabulary not found; copy {VOCAB.name} from "
                                f"OpenAI's CLIP repository there (sha256 {VOCAB_SHA256})")
    if (sha := hashlib.sha256(data := path.read_bytes()).hexdigest()) != VOCAB_SHA256:
        raise OSError(f"{path}: corrupt BPE vocabulary (sha256 {sha}, expected {VOCAB_SHA256}); "
                      f"restore the file from OpenAI's CLIP repository")
    merges = [tuple(m.split()) for m in gzip.decompress(data).decode().split("\n")[1:48895]]
    chars = list(_BYTE_CHARS.values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
    encoder = {t: i for i, t in enumerate(vocab)}                   # 49408 ids
    # written-out special tokens in a text map to their ids, as in OpenAI's tokenizer
    return encoder, {m: i for i, m in enumerate(merges)}, {SOT: [encoder[SOT]], EOT: [encoder[EOT]]}

def _bpe(word, ranks):
    """Apply the merges to one word (a string of byte chars), lowest rank first -> subwords."""
    parts = [*word[:-1], word[-1] + "</w>"]               # "</w>" marks the end of a word
    while len(parts) > 1:
        best = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        i = 0
        while i < len(parts) - 1:                         # every occurrence, left to right
            if (parts[i], parts[i + 1]) == best:
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            i += 1
    return parts

def _encode(text, encoder, ranks, cache):
    """Clean the text as OpenAI does (ftfy, double HTML unescape, whitespace, lower-case) -> ids."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    for piece in _SPLIT.findall(regex.sub(r"\s+", " ", text).strip().lower()):
        if piece not in cache:                             # written-out SOT/EOT are pre-set
            word = "".join(_BYTE_CHARS[b] for b in piece.encode("utf-8"))
            cache[piece] = [encoder[s] for s in _bpe(word, ranks)]
        yield from cache[piece]

def tokenize(texts, context_length=77, truncate=False):
    """str | list[str] -> LongTensor (N, context_length): [SOT, ids..., EOT, 0...]. Too long:
    RuntimeError, or with truncate=True the first context_length ids, EOT last (as OpenAI's)."""
    encoder, ranks, cache = load_bpe()
    texts = [texts] if isinstance(texts, str) else list(texts)
    rows = []
    for text in texts:
        ids = [encoder[SOT], *_encode(text, encoder, ranks, cache), encoder[EOT]]
        if len(ids) > context_length and not truncate:
            short = text if len(text) <= 60 else text[:60] + "..."
            raise RuntimeError(f"Input {short!r} is too long for context length {context_length} "
                               f"({len(ids)} tokens); pass truncate=True to cut it")
        del ids[context_length - 1:-1]                     # truncate before EOT (no-op if it fits)
        rows.append(ids + [0] * (context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long).reshape(len(texts), context_length)

# ------------------------------------------------------------------------------------------------
# images

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_to_rgb = methodcaller("convert", "RGB")                   # picklable, unlike a lambda (workers)

def target_pad(image, target_ratio=1.25):
    """CLIP4Cir's target pad: centred black borders so that long side / short side <= target_ratio;
    the centre crop then keeps the whole image instead of cutting off the ends of a long garment."""
    w, h = image.size
    if max(w, h) / min(w, h) < target_ratio:
        return image
    side = max(w, h) / target_ratio
    pw, ph = max(int((side - w) / 2), 0), max(int((side - h) / 2), 0)
    return TF.pad(image, [pw, ph, pw, ph], fill=0)

def make_transform(name="clip", size=224, target_ratio=1.25, pixels=False):
    """'clip' | 'targetpad' -> picklable callable(PIL.Image) -> (3, size, size) normalised tensor;
    pixels=True: the uint8 a decoded-image cache stores (normalize_pixels completes it bitwise)."""
    if name not in ("clip", "targetpad"):
        raise ValueError(f"unknown transform {name!r}; choose 'clip' or 'targetpad'")
    steps = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), _to_rgb]
    if name == "targetpad":
        steps.insert(0, partial(target_pad, target_ratio=target_ratio))
    steps += [T.PILToTensor()] if pixels else [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(steps)

def normalize_pixels(x):
    """uint8 (B, 3, H, W) -> float (B, 3, H, W), bit-equal to ToTensor + Normalize."""
    return TF.normalize(x.float().div(255), CLIP_MEAN, CLIP_STD)
