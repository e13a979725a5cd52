"""Evaluation: the official CIRR and FashionIQ protocols, Shoes as its papers evaluate it, the evaluation CLI, CIRR
test-server files.

Protocols (the datasets' official ones)
- FashionIQ (val): per category, gallery = that category's val images; Recall@10 / Recall@50 of the target.
- CIRR (val): gallery = all images of the split; the reference image is removed from each ranking *before* any
  metric; Recall@1/5/10/50 over the whole gallery; Recall_subset@1/2/3 over the ranking restricted to the query's
  `img_set.members` minus the reference (the order inside the subset is the order of the full ranking).
- CIRR (test1): no targets; `write_submission` writes the two JSON files the evaluation server takes.
- Shoes (test; it has no val split): gallery = all 4,658 images of eval_im_names.txt; the reference image is
  removed from each ranking; Recall@1/10/50 and their mean. A query whose reference is its target (one in test)
  is a miss at every K, as in TG-CIR's, DQU-CIR's and COMBINER's code.

Ranking is by cosine similarity, computed as chunked matrix products so memory stays O(chunk x gallery). Ties are
broken by gallery order (a stable sort): an image earlier in the gallery ranks first among equals.

Usage
    python evaluate.py                                   # best checkpoint of the most recent run in runs/
    python evaluate.py --checkpoint runs/X/best.pt       # dataset, root, model read from the checkpoint
    python evaluate.py --clip ViT-B/32 --dataset cirr --data-root DIR   # zero-shot CLIP, sum fusion
    python evaluate.py --checkpoint runs/X/best.pt --split test1 --submission subs/   # CIRR server files
    python evaluate.py --clip RN50x4 --dataset shoes --data-root DIR     # Shoes test split (its default)
    python evaluate.py --audit --checkpoint runs/X/best.pt   # the suspect training triplets
"""

import argparse
import json
import math
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import data
import runtime
import toy
from model import CIRModel, load_clip, make_transform, normalize_pixels, tokenize
from nfb import PairFeatures, decide_views, detection_metrics, pair_views

CHUNK = 1024  # queries scored at once: memory is CHUNK x gallery floats


# -----------------------------------------------------------------------------
# ranking primitives

def _similarities(q, g):
    """Cosine similarity of a chunk of queries against the whole gallery, in fp32. q (C, D), g (G, D) -> (C, G)."""
    return F.normalize(q.float(), dim=-1) @ F.normalize(g.float(), dim=-1).T


def _rank_of(sims, idx):
    """0-based rank of column idx[i] in row i of sims under a stable descending sort (ties: lower index first).
    sims (C, G), idx (C,) -> (C,) long. Counting beats sorting: O(C x G) with no (C, G) index tensor."""
    s = sims.gather(1, idx[:, None])                                      # (C, 1) score of the item
    cols = torch.arange(sims.shape[1], device=sims.device)[None]          # (1, G)
    ahead = (sims > s) | ((sims == s) & (cols < idx[:, None]))            # (C, G) items ranked before it
    return ahead.sum(1)


def _check_finite(*feats):
    """NaN compares false with everything, so NaN features would rank every target first: refuse them."""
    if not all(torch.isfinite(f).all() for f in feats):
        raise ValueError("non-finite (NaN/inf) features: the model diverged; lower the learning rate or use "
                         "--amp none / fp32")


def _name_index(names):
    return {n: i for i, n in enumerate(names)}


def _lookup(index, names, what):
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"{len(missing)} {what} not in the gallery, e.g. {missing[:3]}")
    return torch.tensor([index[n] for n in names], dtype=torch.long)


def topk(query_feats, gallery_feats, k, exclude=None, chunk=CHUNK):
    """Indices of the k most similar gallery items for every query, best first.
    query_feats (Q, D), gallery_feats (G, D), exclude (Q,) long or None: one gallery index per query to drop
    (the CIRR reference). Returns (Q, k) long. Ties keep gallery order (stable sort)."""
    g = gallery_feats.to(query_feats.device)
    k = min(k, len(g) - (exclude is not None))          # an excluded image never fills up a short list
    out = []
    for s in range(0, len(query_feats), chunk):
        sims = _similarities(query_feats[s:s + chunk], g)                 # (C, G)
        if exclude is not None:
            sims.scatter_(1, exclude[s:s + chunk, None].to(sims.device), float("-inf"))
        out.append(torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k].cpu())
    return torch.cat(out)


@torch.no_grad()
def score_triplets(q, gallery, tgt, ref, tau, k=3, chunk=CHUNK):
    """Every query of a triplet set ranked over a gallery with its own reference image removed (as CIRR's
    protocol): the NCE loss of its labelled target over the whole gallery (loss.gallery_nce: the NFB's losses
    with --nfb-losses gallery), the target's 0-based rank, and the k best images other than the target.
    q (Q, D), gallery (G, D) L2-normalised, tgt (Q,), ref (Q,) gallery rows -> dict(loss (Q,), rank (Q,),
    top (Q, k)). Memory O(chunk x G)."""
    g = gallery.to(q.device)
    out = dict(loss=[], rank=[], top=[])
    for s in range(0, len(q), chunk):
        sims = _similarities(q[s:s + chunk], g)                               # (C, G)
        t, r = tgt[s:s + chunk].to(sims.device), ref[s:s + chunk].to(sims.device)
        r = torch.where(r == t, -1, r)                                        # a self-pair keeps its target
        rows = (r >= 0).nonzero().squeeze(1)
        sims[rows, r[rows]] = float("-inf")                                   # drop the reference
        logp = (sims / tau).log_softmax(1)
        out["loss"].append(-logp.gather(1, t[:, None]).squeeze(1).cpu())
        out["rank"].append(_rank_of(sims, t).cpu())
        sims.scatter_(1, t[:, None], float("-inf"))                           # the best *other* images
        out["top"].append(sims.topk(min(k, sims.shape[1] - 2), dim=1).indices.cpu())
    return {key: torch.cat(v) for key, v in out.items()}


# -----------------------------------------------------------------------------
# the two protocols

def cirr_metrics(query_feats, gallery_feats, gallery_names, reference_names, target_names, members,
                 chunk=CHUNK):
    """CIRR recall (percent). query_feats (Q, D), gallery_feats (G, D); names are lists; members[i] is the
    query's img_set.members (it contains the reference, which is removed here as in the official protocol)."""
    _check_finite(query_feats, gallery_feats)
    index = _name_index(gallery_names)
    ref = _lookup(index, reference_names, "reference images")                 # (Q,)
    tgt = _lookup(index, target_names, "target images")                       # (Q,)
    sub = [[index[m] for m in ms if m != r] for ms, r in zip(members, reference_names)]
    if any(len(s) != len(sub[0]) for s in sub):
        raise ValueError("every query needs the same number of subset members")
    sub = torch.tensor(sub, dtype=torch.long)                                 # (Q, 5)
    if not (sub == tgt[:, None]).any(1).all():
        raise ValueError("a target image is missing from its query's subset members")
    g = gallery_feats.to(query_feats.device)
    ranks, sub_ranks = [], []
    for s in range(0, len(query_feats), chunk):
        sims = _similarities(query_feats[s:s + chunk], g)                     # (C, G)
        r, t, m = (x[s:s + chunk].to(sims.device) for x in (ref, tgt, sub))
        sims.scatter_(1, r[:, None], float("-inf"))                           # drop the reference
        ranks.append(_rank_of(sims, t).cpu())
        # Restricted ranking: the members' scores in gallery-index order keep the stable-sort tie rule.
        m_sorted, _ = m.sort(dim=1)                                           # (C, 5)
        pos = (m_sorted == t[:, None]).long().argmax(1)                       # target's column in the subset
        sub_ranks.append(_rank_of(sims.gather(1, m_sorted), pos).cpu())
    ranks, sub_ranks = torch.cat(ranks), torch.cat(sub_ranks)
    out = {f"R@{k}": 100.0 * (ranks < k).double().mean().item() for k in (1, 5, 10, 50)}
    out.update({f"Rsubset@{k}": 100.0 * (sub_ranks < k).double().mean().item() for k in (1, 2, 3)})
    return out


def fashioniq_metrics(query_feats, gallery_feats, gallery_names, target_names, chunk=CHUNK):
    """FashionIQ recall (percent) for one category: rank of the target among the category's val images."""
    _check_finite(query_feats, gallery_feats)
    tgt = _lookup(_name_index(gallery_names), target_names, "target images")
    g = gallery_feats.to(query_feats.device)
    ranks = torch.cat([_rank_of(_similarities(query_feats[s:s + chunk], g), tgt[s:s + chunk].to(g.device)).cpu()
                       for s in range(0, len(query_feats), chunk)])
    return {f"R@{k}": 100.0 * (ranks < k).double().mean().item() for k in (10, 50)}


def shoes_metrics(query_feats, gallery_feats, gallery_names, reference_names, target_names,
                  chunk=CHUNK):
    """Shoes recall (percent) as the CLIP-based Shoes papers compute it (TG-CIR, DQU-CIR, COMBINER):
    rank of the target among all test images, the query's reference removed; R@1/10/50 over every
    query. A self-pair (reference = target) is a miss at every K: its target is the removed image
    (their code sets the reference's score to the minimum, keeps the top 50 and divides by the
    number of queries). query_feats (Q, D), gallery_feats (G, D); names are lists."""
    _check_finite(query_feats, gallery_feats)
    index = _name_index(gallery_names)
    ref = _lookup(index, reference_names, "reference images")             # (Q,)
    tgt = _lookup(index, target_names, "target images")                   # (Q,)
    g = gallery_feats.to(query_feats.device)
    ranks = []
    for s in range(0, len(query_feats), chunk):
        sims = _similarities(query_feats[s:s + chunk], g)                 # (C, G)
        r, t = ref[s:s + chunk].to(sims.device), tgt[s:s + chunk].to(sims.device)
        sims.scatter_(1, r[:, None], float("-inf"))                       # drop the reference
        ranks.append(_rank_of(sims, t).cpu())
    ranks = torch.cat(ranks)                                              # (Q,)
    hit = ref != tgt                                                      # a self-pair never counts
    return {f"R@{k}": 100.0 * ((ranks < k) & hit).double().mean().item() for k in (1, 10, 50)}


def format_metrics(m):
    return " ".join(f"{k} {v:.2f}" for k, v in m.items() if "_" not in k)


# -----------------------------------------------------------------------------
# encoding: the gallery once (both roles from one tower pass), the queries in batches

@dataclass
class Encoder:
    """How features are computed: the model, the batch size, the device, the loader's workers, autocast. Under
    torchrun (world > 1) every rank encodes its contiguous share of the images or queries and the rows are
    gathered, so each rank ends with all of them, in order, in 1/world of the time."""
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


def _loader(ds, batch_size, workers):
    return DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=torch.cuda.is_available())


@torch.no_grad()
def encode_gallery(enc, gallery, tokens=False):
    """Every gallery image through the image tower once. Returns (f_ref (N, D), f_tar (N, D)) in gallery order:
    the reference-role and target-role WCB features of each image; or, with tokens=True, the tokens (N, 1+m, D)."""
    model = enc.model.eval()
    rows = enc.share(len(gallery))
    pixels = getattr(gallery, "pixels", None)          # decoded once (data.decode_images): no file opened here
    if pixels is None:
        part = gallery if enc.world == 1 else Subset(gallery, rows.tolist())
        batches = (x for _, x in _loader(part, enc.batch_size, enc.workers))
    else:
        batches = (normalize_pixels(pixels[rows[s:s + enc.batch_size]]) for s in range(0, len(rows), enc.batch_size))
    out = []
    for images in tqdm(batches, desc="gallery", leave=False, disable=enc.rank != 0):
        with enc.amp or nullcontext():
            tok = model.image_tokens(images.to(enc.device, non_blocking=True))   # (B, 1+m, D)
            out.append(tok.half() if tokens else
                       torch.stack([model.image_features(tok, "ref")[0], model.image_features(tok, "tar")[0]]).float())
    if tokens:
        return runtime.gather_rows(torch.cat(out), len(gallery))
    out = runtime.gather_rows(torch.cat(out, dim=1).transpose(0, 1), len(gallery))    # (N, 2, D)
    return out[:, 0].contiguous(), out[:, 1].contiguous()


@torch.no_grad()
def encode_texts(enc, texts):
    """f_txt (Q, D) fp32, the WCB-compensated text feature of every text (list of str)."""
    model = enc.model.eval()
    ctx = model.clip.context_length
    rows = enc.share(len(texts)).tolist()
    out = []
    for s in range(0, len(rows), enc.batch_size):
        tokens = tokenize([texts[i] for i in rows[s:s + enc.batch_size]], ctx, truncate=True).to(enc.device)
        with enc.amp or nullcontext():
            out.append(model.text_features(tokens)[0].float())
    return runtime.gather_rows(torch.cat(out), len(texts))


@torch.no_grad()
def encode_queries(enc, texts, ref_feats):
    """q = normalize(f_txt + f_ref) for every query. texts: list of str, ref_feats (Q, D) -> (Q, D)."""
    f_txt = encode_texts(enc, texts)
    return F.normalize(f_txt + ref_feats.to(f_txt.device).float(), dim=-1)


@torch.no_grad()
def pair_features(enc, trips, f_ref, f_tar):
    """nfb.PairFeatures of every triplet of `trips`, its split's gallery features given (f_ref, f_tar (N, D), in
    .images order): the distinct texts encoded once, the subsets where the dataset has them (data.subset_rows)."""
    texts = [t["text"] for t in trips.triplets]
    distinct = list(dict.fromkeys(texts))
    row = {x: k for k, x in enumerate(distinct)}
    return PairFeatures(f_txt=encode_texts(enc, distinct), text_idx=torch.tensor([row[x] for x in texts]),
                        f_ref=f_ref[trips.ref_idx].float(), gallery=F.normalize(f_tar.float(), dim=-1),
                        tgt_idx=trips.tgt_idx, ref_idx=trips.ref_idx, subsets=data.subset_rows(trips))


# The split that validation during training and evaluate.py use by default: Shoes has no val
# split, and its papers (and so this project) validate on test.
EVAL_SPLIT = {"toy": "val", "cirr": "val", "fashioniq": "val", "shoes": "test"}


def eval_sets(s, split, transform):
    """[(name, gallery dataset, triplets dataset)] of the settings s (dataset, data_root, categories,
    skip_missing): one for CIRR (and the toy) and for Shoes, one per FashionIQ category."""
    per = [("shoes" if s.dataset == "shoes" else "cirr", s)]
    if s.dataset == "fashioniq":
        per = [(c, SimpleNamespace(**{**vars(s), "categories": (c,)})) for c in s.categories]
    return [(name, data.dataset(c, split, "gallery", transform), data.dataset(c, split, "triplets", return_images=False))
            for name, c in per]


def set_features(enc, gallery, trips):
    """Query features (Q, D) and normalised target-role gallery features (N, D) of one evaluation set."""
    f_ref, f_tar = encode_gallery(enc, gallery)
    refs = torch.tensor([gallery.index[t["reference"]] for t in trips.triplets])
    q = encode_queries(enc, [t["text"] for t in trips.triplets], f_ref[refs])
    return q, F.normalize(f_tar, dim=-1)


def evaluate_sets(enc, sets, dataset, feats=None):
    """Validation metrics of the model on eval_sets(...). CIRR: R@K, Rsubset@K, avg = (R@5 + Rsubset@1)/2.
    FashionIQ: per category '<cat>_R@10', '<cat>_R@50', their means 'R@10', 'R@50', and avg.
    Shoes: R@1, R@10, R@50 and avg = their mean.
    feats: an optional dict that receives each set's (query, gallery) features, for reuse."""
    out = {}
    for name, gallery, trips in sets:
        q, g = set_features(enc, gallery, trips)
        if feats is not None:
            feats[name] = (q, g)
        tr = trips.triplets
        if dataset == "fashioniq":
            m = fashioniq_metrics(q, g, gallery.images, [t["target"] for t in tr])
            out.update({f"{name}_{k}": v for k, v in m.items()})
        elif dataset == "shoes":
            refs, tgts = [t["reference"] for t in tr], [t["target"] for t in tr]
            out.update(shoes_metrics(q, g, gallery.images, refs, tgts))
        else:
            out.update(cirr_metrics(q, g, gallery.images, [t["reference"] for t in tr], [t["target"] for t in tr],
                                    [t["members"] for t in tr]))
    if dataset == "fashioniq":
        for k in ("R@10", "R@50"):
            out[k] = sum(out[f"{n}_{k}"] for n, _, _ in sets) / len(sets)
        out["avg"] = (out["R@10"] + out["R@50"]) / 2
    elif dataset == "shoes":
        out["avg"] = (out["R@1"] + out["R@10"] + out["R@50"]) / 3
    else:
        out["avg"] = (out["R@5"] + out["Rsubset@1"]) / 2
    return out


# -----------------------------------------------------------------------------
# CIRR test server files

def write_submission(out_dir, pairids, top50, top3, tag="ncl-cir"):
    """Write the two files CIRR's evaluation server takes: recall (top-50 names per pairid, reference excluded)
    and recall_subset (top-3 names within the subset). Returns their paths after checking them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric, tops, k in (("recall", top50, 50), ("recall_subset", top3, 3)):
        sub = {"version": "rc2", "metric": metric}
        sub.update({str(p): list(t) for p, t in zip(pairids, tops)})
        path = out_dir / f"{metric}_submission_{tag}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(sub))
        tmp.replace(path)
        paths.append(path)
    return paths


def check_submission(path, pairids, references, metric, k):
    """Check a server file: version, metric, every pairid present with k distinct names, no query's reference in
    its own list, under the server's 5 MB limit. Raises ValueError naming the first problem."""
    path = Path(path)
    if path.stat().st_size > 5 * 2**20:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, over the server's 5 MB limit")
    sub = json.loads(path.read_text())
    if sub.get("version") != "rc2" or sub.get("metric") != metric:
        raise ValueError(f"{path}: needs version 'rc2' and metric '{metric}'")
    for p, r in zip(pairids, references):
        names = sub.get(str(p))
        if names is None:
            raise ValueError(f"{path}: pairid {p} missing")
        if len(names) != k or len(set(names)) != k:
            raise ValueError(f"{path}: pairid {p} has {len(names)} names ({len(set(names))} distinct), needs {k}")
        if r in names:
            raise ValueError(f"{path}: pairid {p} lists its own reference image {r}")
    if len(sub) != len(pairids) + 2:
        raise ValueError(f"{path}: {len(sub) - 2} entries for {len(pairids)} queries")


def cirr_rankings(q, g, gallery_names, references, members):
    """Top-50 names (reference removed) and top-3 names within the subset (members minus reference)."""
    index = _name_index(gallery_names)
    ref = _lookup(index, references, "reference images")
    top = topk(q, g, 50, exclude=ref)                                          # (Q, 50)
    top50 = [[gallery_names[j] for j in row] for row in top.tolist()]
    # subset members in gallery order, so ties fall as in the full ranking (stable sort)
    sub = torch.tensor([sorted(index[m] for m in ms if m != r) for ms, r in zip(members, references)],
                       device=q.device)                                                       # (Q, 5)
    sims = torch.einsum("qd,qkd->qk", F.normalize(q.float(), dim=-1), F.normalize(g.float(), dim=-1)[sub])
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :3]          # (Q, 3)
    top3 = [[gallery_names[j] for j in row] for row in sub.gather(1, order).cpu().tolist()]
    return top50, top3


# -----------------------------------------------------------------------------
# audit: the training triplets the model finds suspicious (python evaluate.py --audit)
#
# One no-grad pass over a split: every query ranked over every image of the split, its own
# reference removed (score_triplets, as the NFB's --nfb-losses gallery), gives each triplet its
# loss, its labelled target's rank and the model's 3 best other images; the NFB's GMM on those
# losses, with the run's settings, gives w = p(clean | loss). A low w says "suspect": the model
# finds the labelled target unlikely. It does not say "wrong": a hard edit scores low as well.

AUDIT_SHEET = 24          # rows of the contact sheet
AUDIT_K = (100, 500)      # precision@k / recall@k, besides k = the number of known noisy triplets


def audit_settings(run_args, dataset, root, **given):
    """The settings the audit reads and scores the split with, resolved in one place: the run's
    own (a checkpoint) over train.py's defaults for the dataset (zero-shot, and flags newer than
    the run); `given` (noise, noise_kind, categories, skip_missing, transform) replaces them where
    not None. -> dict of train.py's settings: tau, gmm, nfb_gate, nfb_width, noise, ..."""
    import train                               # train imports this module: imported when used
    s = {**vars(train.defaults(dataset)), **run_args}
    s.update(dataset=dataset, data_root=root, **{k: v for k, v in given.items() if v is not None})
    noise = data.Noise(s["noise"], s["noise_kind"], s["seed"])
    data.check_noise(noise, has_subsets=dataset in ("cirr", "toy"))
    return s


def check_writable(folder):
    """The audit's output folder, created and probed with a temporary file before any heavy work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".audit-probe-"):
            pass
    except OSError as e:
        raise SystemExit(f"error: --out {folder}: cannot write there ({type(e).__name__}: "
                         f"{e.strerror or e}); pass --out DIR, a folder you can write") from None
    return folder


@torch.no_grad()
def audit_scores(enc, gallery, trips, s, times=None, chunk=CHUNK):
    """Every triplet of `trips` scored over the gallery view of its split (same images, same order) -> dict(loss
    (Q,) the query view, rank (Q,) 0-based, top (Q, 3) gallery rows, views {name: (Q,)} the NFB's views of the
    settings s (nfb_views, tau, nfb_text_temp, nfb_text_inverted), view_w {name: (Q,)} each view's clean
    probability, w (Q,) the NFB's decision (nfb.decide_views with gmm, nfb_gate, nfb_width, nfb_gate_by)).
    times: an optional dict that receives the seconds spent encoding and ranking."""
    if gallery.images != trips.images:
        raise ValueError("audit: the gallery and the triplets must be views of the same split")
    t0 = time.perf_counter()
    f_ref, f_tar = encode_gallery(enc, gallery)                                   # (N, D) each
    pf = pair_features(enc, trips, f_ref, f_tar)
    q = F.normalize(pf.f_txt[pf.text_idx] + pf.f_ref, dim=-1)                   # (Q, D)
    _check_finite(q, pf.gallery)
    t1 = time.perf_counter()
    out = score_triplets(q, pf.gallery, trips.tgt_idx, trips.ref_idx, s["tau"], k=3, chunk=chunk)  # O(chunk x N)
    names = [v for v in s["nfb_views"] if v != "subset" or pf.subsets is not None]
    views = pair_views(pf, [v for v in names if v != "query"], s["tau"], s["nfb_text_temp"], s["nfb_text_inverted"])
    views = {"query": out["loss"], **{k: v.cpu() for k, v in views.items()}}
    w, per_view = decide_views(views, names, s["gmm"], s["nfb_gate"], s["nfb_width"], s["nfb_gate_by"])
    out.update(w=w.cpu(), views=views, view_w={k: v[0].cpu() for k, v in per_view.items()})
    if times is not None:
        times.update(encode=t1 - t0, rank=time.perf_counter() - t1)
    return out


def suspicion_order(w, loss):
    """Most suspicious first: ascending w; ties (w saturates at 0 and 1) by descending loss, then
    by index. w, loss (Q,) -> list of Q indices."""
    w, loss = w.tolist(), loss.tolist()
    return sorted(range(len(w)), key=lambda i: (w[i], -loss[i], i))


def triplet_id(t, dataset):
    """The dataset's own identifier of a triplet: CIRR and the toy {pairid, subset (img_set.id)};
    FashionIQ {category, row: its index in cap.<category>.<split>.json}; Shoes {row: its index in
    relative_captions_shoes.json}. A generated positive (--extra-triplets) has None there."""
    if dataset == "fashioniq":
        return dict(category=t["category"], row=t.get("row"))
    if dataset == "shoes":
        return dict(row=t["pairid"])
    return dict(pairid=t["pairid"], subset=t.get("subset"))


def audit_rows(trips, scores, dataset, w_train=None):
    """One dict per triplet, most suspicious first: index (in the split), the identifier
    (triplet_id), reference, text, target, w, loss, rank (1 = the model's first choice, reference
    removed), top3 (the best images other than the target), views {name: {loss, w}} (each view's
    score and clean probability), flagged_by (the views with w < 0.5: why the triplet is suspect),
    w_train (the run's NFB labels, when given), noise (the corrupted field, data.NOISE_FIELDS, when
    the truth is known)."""
    known = bool(trips.noisy.any())
    rows = []
    for i in suspicion_order(scores["w"], scores["loss"]):
        t = trips.triplets[i]
        row = dict(index=i, **triplet_id(t, dataset), reference=t["reference"], text=t["text"],
                   target=t["target"], w=float(scores["w"][i]), loss=float(scores["loss"][i]),
                   rank=int(scores["rank"][i]) + 1,
                   top3=[trips.images[j] for j in scores["top"][i].tolist()],
                   views={k: dict(loss=float(v[i]), w=float(scores["view_w"][k][i]))
                          for k, v in scores["views"].items()},
                   flagged_by=[k for k, w in scores["view_w"].items() if w[i] < 0.5])
        if w_train is not None:
            row["w_train"] = float(w_train[i])
        if known:
            row["noise"] = data.NOISE_FIELDS[int(trips.noise_field[i])]
        rows.append(row)
    return rows


def audit_groups(trips, dataset):
    """The summary's breakdown: (name, a label per triplet), or None (Shoes: totals only)."""
    def edit(text):
        try:
            return toy.edit_type(text)
        except ValueError:                      # a generated positive's template text
            return "other"
    if dataset == "toy":
        return "edit type", [edit(t["text"]) for t in trips.triplets]
    if dataset == "fashioniq":
        return "category", [t["category"] for t in trips.triplets]
    if dataset == "cirr":
        return "subset", [t.get("subset") for t in trips.triplets]
    return None


def audit_summary(trips, scores, dataset, w_train=None, ks=AUDIT_K):
    """Triplets flagged (w < 0.5): in total, by group (audit_groups), by the run's NFB (w_train).
    Where the noise is known (.noisy: the toy's own, injected): precision@k / recall@k of the
    suspicion order, ROC-AUC of 1 - w (nfb.detection_metrics) and of the loss, precision / recall
    of the flags, and the % flagged of each corrupted field (data.NOISE_FIELDS)."""
    from sklearn.metrics import roc_auc_score
    w, flagged = scores["w"], scores["w"] < 0.5
    out = dict(n=len(w), flagged=int(flagged.sum()),
               flagged_by_view={k: int((v < 0.5).sum()) for k, v in scores["view_w"].items()})
    if w_train is not None:
        out["flagged_train"] = int((w_train < 0.5).sum())
        out["flagged_both"] = int((flagged & (w_train < 0.5)).sum())
    noisy = trips.noisy if trips.noisy.any() else None
    groups = audit_groups(trips, dataset)
    if groups is not None:
        by = {}
        truth = noisy.tolist() if noisy is not None else [False] * len(w)
        for g, f, nz in zip(groups[1], flagged.tolist(), truth):
            c = by.setdefault(str(g), dict(n=0, flagged=0, noisy=0, clean_flagged=0))
            c["n"] += 1
            c["flagged"] += f
            c["noisy"] += nz
            c["clean_flagged"] += f and not nz
        if noisy is None:                       # nothing known: no truth columns
            by = {g: dict(n=c["n"], flagged=c["flagged"]) for g, c in by.items()}
        out["by_name"] = groups[0]
        out["by"] = dict(sorted(by.items(), key=lambda kv: -kv[1]["flagged"]))
    if noisy is not None:
        n_noisy = int(noisy.sum())
        hits = noisy[suspicion_order(w, scores["loss"])].long().cumsum(0)  # (Q,) noisy in first k
        out.update(noisy=n_noisy, random_precision=n_noisy / len(w))
        for k in dict.fromkeys(min(k, len(w)) for k in (n_noisy, *ks)):
            out[f"precision@{k}"] = hits[k - 1].item() / k
            out[f"recall@{k}"] = hits[k - 1].item() / n_noisy
        det = detection_metrics(w, noisy)
        out.update(auc=det["auc"], precision_flagged=det["precision"], recall_flagged=det["recall"])
        out["auc_loss"] = (float(roc_auc_score(noisy.numpy(), scores["loss"].numpy()))
                           if n_noisy < len(w) else math.nan)
        f = trips.noise_field
        by_field = lambda fl: {name: 100 * fl[f == k].float().mean().item()
                               for k, name in enumerate(data.NOISE_FIELDS) if (f == k).any()}
        out["flagged_by_field"] = by_field(flagged)
        out["view_flagged_by_field"] = {k: by_field(v < 0.5) for k, v in scores["view_w"].items()}
        out["view_auc"] = {k: float(roc_auc_score(noisy.numpy(), v.numpy())) if n_noisy < len(w) else math.nan
                           for k, v in scores["views"].items()}
    return out


def print_audit_summary(s, what, top_groups=10):
    """The summary in a few lines; of many groups (CIRR's subsets) the top_groups most flagged."""
    print(f"audit of {what}: {s['n']:,} triplets, {s['flagged']:,} flagged "
          f"(w < 0.5, {100 * s['flagged'] / s['n']:.1f}%)")
    print("  flagged by each view (a triplet is flagged when any view of the decision flags it): "
          + ", ".join(f"{k} {v:,}" for k, v in s["flagged_by_view"].items()))
    if "flagged_train" in s:
        print(f"  the run's NFB at this checkpoint flagged {s['flagged_train']:,} "
              f"(both: {s['flagged_both']:,})")
    if "by" in s:
        many = len(s["by"]) > top_groups
        print(f"  by {s['by_name']}" + (f", the {top_groups} most flagged of {len(s['by']):,}"
                                        if many else "") + ":")
        for g, c in list(s["by"].items())[:top_groups]:
            line = (f"    {g:<10} {c['flagged']:>6,} of {c['n']:>6,} flagged "
                    f"({100 * c['flagged'] / c['n']:5.1f}%)")
            if "noisy" in c:
                line += f"  noisy {c['noisy']:>6,}  clean flagged {c['clean_flagged']:>6,}"
            print(line)
    if "noisy" in s:
        ks = [key.split("@")[1] for key in s if key.startswith("precision@")]
        print(f"  known noise: {s['noisy']:,} noisy triplets (a random order's precision: "
              f"{s['random_precision']:.3f})")
        print("  " + " | ".join(f"precision@{k} {s['precision@' + k]:.3f} "
                                f"recall@{k} {s['recall@' + k]:.3f}" for k in ks))
        print(f"  ROC-AUC of 1 - w {s['auc']:.3f}, of the loss {s['auc_loss']:.3f}; the flagged: "
              f"precision {s['precision_flagged']:.3f} recall {s['recall_flagged']:.3f}")
        print("  flagged by corrupted field: "
              + ", ".join(f"{k} {v:.1f}%" for k, v in s["flagged_by_field"].items()))
        for view, by in s["view_flagged_by_field"].items():
            print(f"    the {view} view alone (AUC {s['view_auc'][view]:.3f}): "
                  + ", ".join(f"{k} {v:.1f}%" for k, v in by.items()))


def _sheet_label(k, r):
    """The contact sheet's label of row r, the (k+1)-th most suspicious."""
    ids = " ".join(f"{key} {r[key]}" for key in ("pairid", "category", "row") if key in r)
    truth = "" if "noise" not in r else (
        "\ntruth: clean" if r["noise"] == "clean" else f"\ntruth: {r['noise']} replaced")
    why = f"\nflagged by: {', '.join(r['flagged_by'])}" if r["flagged_by"] else ""
    return f"#{k + 1} {ids}\nw {r['w']:.3f}  loss {r['loss']:.2f}  rank {r['rank']:,}" + why + truth


def audit(enc, s, ckpt, split, out_dir, chunk=CHUNK):
    """python evaluate.py --audit: score every triplet of a split (train by default) with the
    settings s (audit_settings), write audit.jsonl (one row per triplet, most suspicious first),
    audit.png (the AUDIT_SHEET most suspicious) and audit_summary.json into out_dir, print the
    summary. ckpt: the run's checkpoint (its NFB labels are reported as w_train when they are of
    the same training triplets), or None (zero-shot). Other splits than train write
    audit_<split>.*. Returns the summary dict."""
    dataset = s["dataset"]
    if split == "test1" or (split == "test" and dataset == "fashioniq"):
        raise SystemExit(f"error: --audit --split {split}: the {dataset} {split} split has no "
                         f"public targets to audit; use --split train (the default) or val")
    out_dir = check_writable(out_dir)
    run = argparse.Namespace(**s)
    trips = data.dataset(run, split, "triplets", return_images=False)
    if (trips.tgt_idx < 0).any():
        raise SystemExit(f"error: --audit --split {split}: the {dataset} {split} split has no "
                         f"targets; use --split train (the default) or val")
    cached = bool(s["cache_images"])           # as the run: decoded once into RAM (the toy)
    res = enc.model.clip.image_resolution
    gallery = data.dataset(run, split, "gallery", make_transform(s["transform"], res, pixels=cached))
    w_train = None                             # the run's NFB labels, if of these very triplets
    if ckpt is not None and ckpt.get("nfb") is not None and split == "train":
        w_train = ckpt["nfb"]["weights"].float()
        changed = [k for k in ("noise", "noise_kind", "seed", "skip_missing", "extra_triplets")
                   if s[k] != ckpt["args"].get(k)]
        if changed or len(w_train) != len(trips):
            print(f"audit: the run's NFB labels {len(w_train)} triplets, this split {len(trips)} "
                  f"({', '.join(changed) or 'other data'} changed): not reported")
            w_train = None

    t0 = time.perf_counter()
    times = dict(decode=0.0)
    if cached:
        gallery.pixels = data.decode_images(gallery, enc.workers)
        times["decode"] = time.perf_counter() - t0
    scores = audit_scores(enc, gallery, trips, s, times, chunk)
    rows = audit_rows(trips, scores, dataset, w_train)
    summary = audit_summary(trips, scores, dataset, w_train)
    summary.update({k: s[k] for k in ("tau", "gmm", "nfb_gate", "nfb_width", "nfb_views", "nfb_gate_by",
                                      "nfb_text_temp", "nfb_text_inverted")})
    name = "audit" if split == "train" else f"audit_{split}"
    jsonl = out_dir / f"{name}.jsonl"
    tmp = jsonl.with_name(jsonl.name + ".tmp")
    tmp.write_text("".join(json.dumps(runtime.strict_json(r)) + "\n" for r in rows))
    tmp.replace(jsonl)
    paths = gallery.paths
    sheet = [(paths[r["reference"]], r["text"], paths[r["target"]], paths[r["top3"][0]],
              _sheet_label(k, r)) for k, r in enumerate(rows[:AUDIT_SHEET])]
    runtime.audit_sheet(sheet, out_dir / f"{name}.png")
    summary.update({f"time_{k}": v for k, v in times.items()}, time_total=time.perf_counter() - t0)
    summary_json = json.dumps(runtime.strict_json(summary), indent=1)
    (out_dir / f"{name}_summary.json").write_text(summary_json)
    noise = (f" ({s['noise_kind']} noise {s['noise']}, seed {s['seed']})"
             if split == "train" and s["noise"] else "")
    print_audit_summary(summary, f"{dataset} {split}{noise}")
    print(f"wrote {jsonl} ({len(rows):,} rows, most suspicious first) and {name}.png "
          f"({len(sheet)} rows) in {summary['time_total']:.1f} s: decoding images "
          f"{times['decode']:.1f} s, encoding {times['encode']:.1f} s, ranking and GMM "
          f"{times['rank']:.1f} s")
    return summary


# -----------------------------------------------------------------------------
# command line

def latest_best(runs="runs"):
    found = sorted(Path(runs).glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"error: no run with a best.pt under {Path(runs).resolve()}; train one with "
                         f"`python train.py` or pass --checkpoint / --clip")
    return found[-1]


def main(argv=None):
    p = runtime.ArgumentParser(__doc__)
    p.add_argument("--checkpoint", default=None, help="a run's best.pt (default: the most recent run's)")
    p.add_argument("--clip", default=None, help="zero-shot: OpenAI CLIP name or path, sum fusion, no training")
    p.add_argument("--dataset", default=None, choices=list(EVAL_SPLIT))
    p.add_argument("--data-root", default=None)
    p.add_argument("--categories", nargs="+", default=None)
    p.add_argument("--split", default=None, help="val (test for Shoes, which has no val), or test1 for CIRR's "
                   "server files; --audit: train (default) or val")
    p.add_argument("--transform", default=None, choices=["clip", "targetpad"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-missing", action="store_true")
    p.add_argument("--submission", default=None, help="folder for the CIRR test-server files (with --split test1)")
    p.add_argument("--show", type=int, default=0, help="write a PNG grid of N queries with their top-5")
    p.add_argument("--audit", action="store_true", help="list the training triplets the model "
                   "finds suspicious (audit.jsonl, audit.png; --split to audit another split)")
    p.add_argument("--noise", type=float, default=None,
                   help="--audit: injected noise (default: the run's; zero-shot: train.py's)")
    p.add_argument("--noise-kind", default=None, help="--audit: " + ", ".join(data.NOISE_KINDS))
    p.add_argument("--out", default=None, help="metrics JSON file (default next to the "
                   "checkpoint); with --audit the folder for its files (default: the run folder)")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.audit and a.submission:
        raise SystemExit("error: --audit lists a split's suspect triplets, --submission writes "
                         "CIRR's test-server files: run them one at a time")
    if not a.audit and (a.noise is not None or a.noise_kind is not None):
        raise SystemExit("error: --noise / --noise-kind are for --audit (evaluation splits carry "
                         "no injected noise)")

    # the dataset and its folder first, so that a bad --data-root stops before a checkpoint is downloaded
    ckpt, path = None, None
    if not a.clip:
        path = Path(a.checkpoint) if a.checkpoint else latest_best()
        if not a.checkpoint:
            print(f"evaluating {path} (the most recent run)")
        ckpt = runtime.load_checkpoint(path)
    run_args, out_dir = (ckpt["args"], path.parent) if ckpt else ({}, Path("."))
    if a.clip and not a.dataset:
        raise SystemExit("error: --clip needs --dataset (and --data-root for cirr / fashioniq / shoes)")
    if a.dataset and run_args and a.dataset != run_args["dataset"]:
        raise SystemExit(f"error: {path} was trained on {run_args['dataset']}, not {a.dataset}; pass "
                         f"--dataset {run_args['dataset']} or a {a.dataset} checkpoint")
    dataset = a.dataset or run_args["dataset"]
    root = a.data_root or run_args.get("data_root") or (str(toy.default_toy_root()) if dataset == "toy" else None)
    if not root:
        raise SystemExit(f"error: --dataset {dataset} needs --data-root DIR")
    if dataset != "toy" and not Path(root).expanduser().is_dir():
        raise SystemExit(f"error: --data-root {root}: no such folder; point it at the {dataset} dataset folder")
    categories = a.categories or run_args.get("categories") or ["dress", "shirt", "toptee"]
    model = CIRModel(load_clip(a.clip, device="cpu")[0], wcb=False) if a.clip else runtime.build_model(ckpt)
    model = model.to(device).eval()
    transform_name = (a.transform or run_args.get("transform")
                      or ("clip" if dataset == "toy" else "targetpad"))
    transform = make_transform(transform_name, model.clip.image_resolution)
    amp, _ = runtime.autocast(run_args.get("amp", "auto"), device)    # the run's precision: metrics match its log
    enc = Encoder(model, a.batch_size, device, a.workers, amp)
    if a.audit:
        s = audit_settings(run_args, dataset, root, noise=a.noise, noise_kind=a.noise_kind,
                           categories=categories, skip_missing=a.skip_missing or None,
                           transform=transform_name)
        return audit(enc, s, ckpt, a.split or "train", Path(a.out) if a.out else out_dir)
    a.split = a.split or EVAL_SPLIT[dataset]
    s = SimpleNamespace(dataset=dataset, data_root=root, categories=categories, skip_missing=a.skip_missing)
    sets = eval_sets(s, a.split, transform)

    if dataset in ("cirr", "toy") and a.split.startswith("test"):
        if not a.submission:
            raise SystemExit(f"error: the {a.split} split has no public targets; pass --submission DIR to write "
                             f"the CIRR evaluation server's files")
        _, gallery, trips = sets[0]
        q, g = set_features(enc, gallery, trips)
        tr = trips.triplets
        refs, pairids = [t["reference"] for t in tr], [t["pairid"] for t in tr]
        top50, top3 = cirr_rankings(q, g, gallery.images, refs, [t["members"] for t in tr])
        paths = write_submission(a.submission, pairids, top50, top3)
        for path, metric, k in zip(paths, ("recall", "recall_subset"), (min(50, len(gallery.images) - 1), 3)):
            check_submission(path, pairids, refs, metric, k)
        print(f"wrote and checked {len(pairids)} queries: " + ", ".join(map(str, paths)))
        return paths
    if any(t["target"] is None for _, _, trips in sets for t in trips.triplets):
        raise SystemExit(f"error: the {dataset} {a.split} split has no public targets; evaluate on --split val")

    feats = {}
    metrics = evaluate_sets(enc, sets, dataset, feats)
    width = max(map(len, metrics))
    print(f"{dataset} {a.split}" + (f" ({', '.join(categories)})" if dataset == "fashioniq" else ""))
    for k, v in metrics.items():
        print(f"  {k:<{width}}  {v:6.2f}")
    out = Path(a.out) if a.out else out_dir / f"metrics_{dataset}_{a.split}.json"
    out.write_text(json.dumps(metrics, indent=1))
    print(f"metrics written to {out}")
    if a.show:
        name, gallery, trips = sets[0]
        q, g = feats[name]
        n = min(a.show, len(q))
        exclude = None if dataset == "fashioniq" else torch.tensor(
            [gallery.index[t["reference"]] for t in trips.triplets[:n]])
        top = topk(q[:n], g, 5, exclude=exclude)
        rows = [(gallery.paths[t["reference"]], t["text"],
                 [(gallery.paths[gallery.images[j]], gallery.images[j] == t["target"]) for j in row])
                for t, row in zip(trips.triplets[:n], top.tolist())]
        path = out.with_name(f"show_{dataset}_{a.split}.png")
        runtime.query_grid(rows, path)
        print(f"query grid written to {path}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:   # bad input: one line, no traceback
        sys.exit(f"error: {runtime.error_line(e)}")
