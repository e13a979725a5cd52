"""What CLIP reads: texts as token ids (OpenAI's byte-level BPE tokenizer, rewritten) and images as normalised
tensors (CLIP's transform and CLIP4Cir's target pad).

tokenize(texts) gives exactly what OpenAI's `clip.tokenize` gives, id for id: the same text cleaning (ftfy, double
HTML unescape, whitespace collapsed, lower-case), the same pre-split regex, the same 48,894 merges from
assets/bpe_simple_vocab_16e6.txt.gz (checked against its SHA-256), the same too-long / truncate behaviour.
make_transform(name, size) gives OpenAI's preprocessing tensor for tensor ('clip'), or CLIP4Cir's target pad before
it ('targetpad'); with pixels=True it stops at uint8, what a decoded-image cache stores (normalize_pixels finishes).
"""

import gzip
import hashlib
import html
import math
from functools import lru_cache, partial
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


@lru_cache()
def _byte_chars():
    """byte -> a printable unicode char, so BPE works on strings: printable latin-1 bytes map to themselves,
    the other 68 (control, space, ...) to chr(256 + k). The insertion order fixes the first 256 token ids."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(rest)}}


@lru_cache()
def load_bpe(path=VOCAB):
    """-> (encoder {subword: id}, merge ranks {(a, b): rank}, cache {piece: ids}); the file's SHA-256 is checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: BPE vocabulary not found; copy bpe_simple_vocab_16e6.txt.gz from OpenAI's "
                                f"CLIP repository there (sha256 {VOCAB_SHA256})")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
        raise OSError(f"{path}: corrupt BPE vocabulary (sha256 {hashlib.sha256(data).hexdigest()}, expected "
                      f"{VOCAB_SHA256}); restore the file from OpenAI's CLIP repository")
    lines = gzip.decompress(data).decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]   # header line, 48894 merges
    merges = [tuple(line.split()) for line in lines]
    chars = list(_byte_chars().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]   # 49408 ids
    encoder = {t: i for i, t in enumerate(vocab)}
    # written-out special tokens in a text map to their ids, as in OpenAI's tokenizer
    return encoder, {m: i for i, m in enumerate(merges)}, {SOT: [encoder[SOT]], EOT: [encoder[EOT]]}


def _bpe(word, ranks):
    """Apply the merges to one word (a string of byte chars), lowest rank first -> list of subwords."""
    parts = [*word[:-1], word[-1] + "</w>"]               # "</w>" marks the end of a word
    while len(parts) > 1:
        best = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):                              # merge every occurrence, left to right, no overlaps
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


_SPACES = regex.compile(r"\s+")


def _encode(text, encoder, ranks, cache):
    """Clean the text as OpenAI does (ftfy, double HTML unescape, whitespace, lower-case) -> list of ids."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    text = _SPACES.sub(" ", text).strip().lower()
    ids = []
    for piece in _SPLIT.findall(text):
        if piece not in cache:                             # cache: piece -> ids (written-out SOT/EOT are pre-set)
            chars = _byte_chars()
            cache[piece] = [encoder[s] for s in _bpe("".join(chars[b] for b in piece.encode("utf-8")), ranks)]
        ids += cache[piece]
    return ids


def tokenize(texts, context_length=77, truncate=False):
    """str | list[str] -> LongTensor (N, context_length): [SOT, ids..., EOT, 0...]. Too long: RuntimeError, or
    with truncate=True the first context_length ids with EOT as the last one (as clip.tokenize)."""
    encoder, ranks, cache = load_bpe()
    texts = [texts] if isinstance(texts, str) else list(texts)
    rows = []
    for text in texts:
        ids = [encoder[SOT], *_encode(text, encoder, ranks, cache), encoder[EOT]]
        if len(ids) > context_length:
            if not truncate:
                short = text if len(text) <= 60 else text[:60] + "..."
                raise RuntimeError(f"Input {short!r} is too long for context length {context_length} ({len(ids)} "
                                   f"tokens); pass truncate=True to cut it")
            ids = ids[:context_length - 1] + [encoder[EOT]]
        rows.append(ids + [0] * (context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long).reshape(len(texts), context_length)


# ----------------------------------------------------------------------------------------------------------------
# images

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image):
    return image.convert("RGB")


def target_pad(image, target_ratio=1.25):
    """CLIP4Cir's target pad: black borders, centred, so that long side / short side <= target_ratio; the centre
    crop then keeps the whole image instead of cutting off the ends of a long garment."""
    w, h = image.size
    if max(w, h) / min(w, h) < target_ratio:
        return image
    side = max(w, h) / target_ratio
    pw, ph = max(int((side - w) / 2), 0), max(int((side - h) / 2), 0)
    return TF.pad(image, [pw, ph, pw, ph], fill=0)


def make_transform(name="clip", size=224, target_ratio=1.25, pixels=False):
    """'clip' | 'targetpad' -> callable(PIL.Image) -> (3, size, size) normalised tensor (picklable, for workers).
    pixels=True stops before the float conversion: (3, size, size) uint8, what a decoded-image cache stores;
    normalize_pixels then gives exactly the float tensor of the full transform."""
    if name not in ("clip", "targetpad"):
        raise ValueError(f"unknown transform {name!r}; choose 'clip' or 'targetpad'")
    steps = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), _to_rgb]
    if name == "targetpad":
        steps.insert(0, partial(target_pad, target_ratio=target_ratio))
    steps += [T.PILToTensor()] if pixels else [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(steps)


def normalize_pixels(x):
    """uint8 images (B, 3, H, W) -> float (B, 3, H, W), the same arithmetic as ToTensor + Normalize (bit-equal)."""
    return TF.normalize(x.float().div(255), CLIP_MEAN, CLIP_STD)
