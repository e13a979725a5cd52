"""Features, computed in one place: every image of a split through the image tower once (both roles
in one pass), the distinct texts once, then the queries; under torchrun each process encodes its
share and every process gets all rows. An ImageSource turns the image indices of an item (ref
index, text, target index, i) into the model's input, wherever the images are:
    files     read and transformed from disk by the loader's workers (real data)
    pixels    decoded once into a uint8 tensor (--cache-images; the toy): no file is opened again
    tokens    a frozen image tower's tokens, computed once (--encoder text): steps cost texts only
    features  SPN stage 2: every image's reference feature f_ref, and the bank of normalised targets
A folder of images is a gallery too (search.py): folder_features encodes it once, cached while the
folder and the model stay the same.
"""

import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms.functional import to_tensor

from triplets import load_image
import runtime
import util
from model import Features, Tokens, compose
from preprocess import normalize_pixels, tokenize
from nfb import PairFeatures

@dataclass
class Encoder:
    """How features are computed: model, batch size, device, loader workers, autocast. Under
    torchrun (world > 1) each rank encodes a contiguous share; every rank gets all rows in order."""
    model: nn.Module
    batch_size: int = 128
    device: torch.device = torch.device("cpu")
    workers: int = 2
    amp: object = None
    rank: int = 0
    world: int = 1

    def share(self, n):
        """This rank's rows of n: a contiguous range (every row, in one process)."""
        return torch.tensor_split(torch.arange(n), self.world)[self.rank]

class ImageSource:
    """A split's images by index (ds.images order), as the loader's indices reach the model: read
    from disk (files), or from a cache: decoded pixels, a frozen tower's Tokens, SPN's Features.
    The constructors below pick the kind; `inputs` hands the model its input type."""
    in_workers = False      # files are read in the loader's workers; a cache in the main process
    bank = None             # SPN's bank (N, D) of normalised target features

    def __init__(self, ds, transform=None, cache=None, bank=None):
        self.images, self.paths = ds.images, ds.paths
        self.transform, self.cache, self.bank = transform, cache, bank

    @classmethod
    def files(cls, ds, transform=None):
        """Images read from disk: transform (PIL image -> tensor), or to_tensor (as they are)."""
        return _Files(ds, transform or to_tensor)

    @classmethod
    def pixels(cls, ds, transform, workers=0, rank=0):
        """Every image decoded once, (N, 3, H, W) uint8: transform must end in uint8."""
        t, load = time.perf_counter(), cls.files(ds, transform).load
        pixels = torch.cat(list(_batches(load, list(range(len(ds.images))), 256, workers)))
        if pixels.dtype != torch.uint8:
            raise ValueError("ImageSource.pixels needs a uint8 transform: "
                             "preprocess.make_transform(..., pixels=True)")
        util.log(f"decoded {ds.split} images once: {tuple(pixels.shape)} uint8, "
                 f"{pixels.numel() / 2**20:.0f} MiB, {time.perf_counter() - t:.1f} s")
        return _Pixels(ds, cache=pixels)

    @classmethod
    def tokens(cls, ds, enc, images):
        """--encoder text: the tokens (N, 1+m, D) fp16 of `images` (files, pixels), once: frozen."""
        t = time.perf_counter()
        tok = encode_images(enc, images, tokens=True).half().cpu()
        util.log(f"cached image tokens {tuple(tok.shape)} fp16, {tok.numel() * 2 / 2**20:.0f} MiB, "
                 f"{time.perf_counter() - t:.1f} s")
        return _Tokens(ds, cache=tok)

    @classmethod
    def features(cls, ds, enc, images, path, reuse=False):
        """SPN stage 2: every image's f_ref and normalised target feature (the bank), once, from
        `images`; saved to `path` by rank 0 and read back when the run resumes (reuse)."""
        if reuse and path.exists():
            c = torch.load(path, map_location="cpu", weights_only=True)
            return _Features(ds, cache=c["ref"], bank=c["bank"].to(enc.device))
        t = time.perf_counter()
        f_ref, f_tar = encode_images(enc, images)
        bank = F.normalize(f_tar.float(), dim=-1)                                # (N, D)
        if enc.rank == 0:
            util.atomic_write(path, {"ref": f_ref.cpu(), "bank": bank.cpu()})
        util.log(f"SPN bank: {len(bank)} training images x {bank.shape[1]} dims, "
                 f"{bank.nbytes / 2**20:.1f} MiB on every rank, {time.perf_counter() - t:.1f} s")
        return _Features(ds, cache=f_ref.cpu(), bank=bank.to(enc.device))

    def load(self, idx):
        """In the loader: indices (list) -> what `inputs` takes (a cache's rows: the indices)."""
        return torch.as_tensor(idx)

    def inputs(self, x, device, role="ref"):
        """What `load` gave -> the model's input on the device (a batch's rows leave the CPU)."""
        return self.cache[x].to(device, non_blocking=device.type == "cuda")

class _Files(ImageSource):
    in_workers = True

    def load(self, idx):
        return torch.stack([self.transform(load_image(self.paths[self.images[i]])) for i in idx])

    def inputs(self, x, device, role="ref"):                   # images (B, 3, H, W)
        return x.to(device, non_blocking=device.type == "cuda")

class _Pixels(ImageSource):
    def inputs(self, x, device, role="ref"):                   # uint8 on the way: 4x less to copy
        return normalize_pixels(super().inputs(x, device))

class _Tokens(ImageSource):
    def inputs(self, x, device, role="ref"):                   # Tokens (B, 1+m, D)
        return Tokens(super().inputs(x, device).float())

class _Features(ImageSource):
    def inputs(self, x, device, role="ref"):  # Features f_ref (B, D); tgt: bank rows
        if role == "tgt":
            return x.to(device, non_blocking=device.type == "cuda")
        return Features(super().inputs(x, device).float())

def _batches(load, rows, batch_size, workers):
    """load over the list `rows` in batches, in a loader's workers; workers None: directly, for
    caches (nothing to read, and a loader would draw from the global random stream)."""
    chunks = [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)]
    if workers is None:
        return map(load, chunks)
    return DataLoader(chunks, batch_size=None, num_workers=workers, collate_fn=load,
                      pin_memory=torch.cuda.is_available())

@torch.no_grad()
def encode_images(enc, source, tokens=False):
    """Every image of a source through the model once -> its reference- and target-role WCB features
    (f_ref, f_tar (N, D), .images order; SPN: f_ref and the bank), or tokens=True: (N, 1+m, D)."""
    model = enc.model.eval()
    if isinstance(source, _Features):  # f_ref in CPU memory, the bank on the device
        return source.cache.to(enc.device), source.bank
    n, workers = len(source.images), enc.workers if source.in_workers else None
    out = []
    for x in _batches(source.load, enc.share(n).tolist(), enc.batch_size, workers):
        with enc.amp or nullcontext():
            x = source.inputs(x, enc.device)
            tok = x.f if isinstance(x, Tokens) else model.image_tokens(x)          # (B, 1+m, D)
            out.append(tok.half() if tokens else torch.stack(                            # (2, B, D)
                [model.image_features(tok, role)[0] for role in ("ref", "tar")]).float())
    if tokens:
        return runtime.gather_rows(torch.cat(out), n)
    out = runtime.gather_rows(torch.cat(out, dim=1).transpose(0, 1), n)                  # (N, 2, D)
    return out[:, 0].contiguous(), out[:, 1].contiguous()

@torch.no_grad()
def encode_texts(enc, texts):
    """f_txt (Q, D) fp32, the WCB-compensated text feature of every text (list of str)."""
    model = enc.model.eval()
    mine = [texts[i] for i in enc.share(len(texts)).tolist()]
    out = []
    for s in range(0, len(mine), enc.batch_size):
        tokens = tokenize(mine[s:s + enc.batch_size], model.clip.context_length, truncate=True)
        with enc.amp or nullcontext():
            out.append(model.text_features(tokens.to(enc.device))[0].float())
    return runtime.gather_rows(torch.cat(out), len(texts))

def check_finite(*feats):
    """NaN compares false with everything, so NaN features would rank every target first."""
    if not all(torch.isfinite(f).all() for f in feats):
        raise ValueError("non-finite (NaN/inf) features: the model diverged; lower the learning "
                         "rate or use --amp none / fp32")

@torch.no_grad()
def query_features(enc, source, trips):
    """Query features (Q, D) and normalised target-role image features (N, D) of a triplet set."""
    f_ref, f_tar = encode_images(enc, source)
    f_txt = encode_texts(enc, [t["text"] for t in trips.triplets])                     # (Q, D)
    return compose(f_txt, f_ref[trips.ref_idx].float()), F.normalize(f_tar.float(), dim=-1)

@torch.no_grad()
def pair_features(enc, source, trips):
    """nfb.PairFeatures of every triplet: its split's images encoded once, distinct texts once."""
    f_ref, f_tar = encode_images(enc, source)
    texts = [t["text"] for t in trips.triplets]
    row = {x: k for k, x in enumerate(dict.fromkeys(texts))}             # distinct texts, in order
    f_txt, gallery = encode_texts(enc, list(row)), F.normalize(f_tar.float(), dim=-1)
    return PairFeatures(f_txt=f_txt, text_idx=torch.tensor([row[x] for x in texts]),
                        f_ref=f_ref[trips.ref_idx].float(), gallery=gallery, tgt_idx=trips.tgt_idx,
                        ref_idx=trips.ref_idx)

# -----------------------------------------------------------------------------
# a folder of images as a gallery: its features computed once, kept while the folder and model stay

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

def scan_folder(folder):
    """Image files below `folder` (any depth, not hidden) -> sorted [(relpath, size, mtime_ns)]."""
    out, todo = [], [Path(folder)]
    while todo:
        with os.scandir(todo.pop()) as it:
            for e in (e for e in it if not e.name.startswith(".")):
                if e.is_dir():
                    todo.append(Path(e.path))
                elif os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES:
                    st = e.stat()
                    out.append((os.path.relpath(e.path, folder), st.st_size, st.st_mtime_ns))
    return sorted(out)

def _read_folder(folder, transform, names):
    """A loader's collate: names -> (images (B, 3, H, W), readable (B,) bool); an unreadable file
    becomes a zero image, marked False: one bad file does not stop the gallery."""
    images = []
    for n in names:
        try:
            images.append(transform(load_image(Path(folder) / n)))
        except OSError:
            images.append(None)
    ok = torch.tensor([x is not None for x in images])
    if not ok.any():
        return None, ok
    blank = torch.zeros_like(images[int(ok.nonzero()[0])])
    return torch.stack([blank if x is None else x for x in images]), ok

@torch.no_grad()
def folder_features(enc, folder, transform, model_id, cache_dir):
    """Every readable image below `folder` -> (names (relative paths), f_tar (N, D) normalised,
    skipped, the cache file, whether it was read): from `cache_dir` when the same model (model_id)
    saw the same files (names, sizes, times), else computed and saved there atomically. skipped:
    unreadable files, kept out so a replaced one is read again."""
    listing = scan_folder(folder)
    if not listing:
        raise FileNotFoundError(f"--gallery {folder}: no {'/'.join(IMAGE_SUFFIXES)} image below it")
    where = Path(folder).resolve()
    key = hashlib.sha256(json.dumps([model_id, str(where), listing]).encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() / f"{where.name}-{key}.pt"
    names = [n for n, _, _ in listing]
    if cache.is_file():
        c = torch.load(cache, map_location="cpu", weights_only=True)
        if sorted(c["names"] + c.get("skipped", [])) == names:
            return c["names"], c["features"], c.get("skipped", []), cache, True
    model, f_tar, ok = enc.model.eval(), [], []
    for x, good in _batches(partial(_read_folder, folder, transform), names, enc.batch_size,
                            enc.workers):
        if x is None:                                    # not one readable image in the batch
            f_tar.append(torch.zeros(len(good), model.clip.embed_dim))
        else:
            with enc.amp or nullcontext():
                tok = model.image_tokens(x.to(enc.device))                       # (B, 1+m, D)
                f_tar.append(model.image_features(tok, "tar")[0].float().cpu())
        ok.append(good)
    f_tar, ok = torch.cat(f_tar), torch.cat(ok)                          # (N, D), (N,) readable
    readable = [n for n, good in zip(names, ok.tolist()) if good]
    skipped = [n for n, good in zip(names, ok.tolist()) if not good]
    if not readable:
        raise OSError(f"--gallery {folder}: none of its {len(names)} image files could be read")
    features = F.normalize(f_tar[ok], dim=-1)
    util.atomic_write(cache, dict(names=readable, features=features, skipped=skipped,
                                  model=model_id))
    return readable, features, skipped, cache, False
