"""Triplets as datasets: TripletDataset (every split is one; a missing image is an error, or with
skip_missing=True dropped), inject_noise (synthetic noise, and its ground truth), and Triplets, the
plain format for your own data: <root>/{train,val,test}.jsonl or .csv, a row a triplet."""
import csv
import functools
import io
import json
import os
import random
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from util import log

def make_triplet(reference, target, text, **given):
    """A triplet, as every reader makes it (only here: the keys cannot drift). pairid (CIRR's, the
    format's id, Shoes' row), target (None on a test split), text (what the model reads), captions
    (FashionIQ's pair, else [text]), members (the query's subset, reference included), category
    (FashionIQ's, the format's), subset (CIRR's img_set id), row (the format's other keys), source
    (the format's row as read, for the audit's clean copy), line (the row's place in its file: from
    1 in .jsonl/.csv, from 0 in a JSON list); None or {} if none."""
    t = dict(pairid=None, reference=reference, target=target, text=text, captions=[text],
             members=None, category=None, subset=None, row={}, source=None, line=None)
    if unknown := given.keys() - t.keys():
        raise TypeError(f"make_triplet: unknown keys {sorted(unknown)}")
    return {**t, **given}

class TripletDataset(Dataset):
    """A split: .triplets (make_triplet's), .images (the gallery, in split-file order), .paths,
    .index {name: row of .images}, .ref_idx / .tgt_idx (N,) (-1: no target), the noise's truth:
    .noise_field (N,) (a NOISE_FIELDS index: what was replaced), .noisy (N,) bool. Item i:
    (ref_idx, text, tgt_idx, i); images are read by index."""

    def _setup(self, name, root, split, found, skip_missing=False, noise=None, extra_triplets=None):
        """found: the layout's images, {name: path}, triplets, and the noise each stores (a
        NOISE_FIELDS index: the toy's, yours); the readers pass skip_missing, noise, extras on."""
        images, paths, triplets, field = found
        self.split, train = split, split == "train"
        missing = find_missing({n: paths[n] for n in images})
        if missing and not skip_missing:
            eg = "\n".join(f"  {n}: {paths[n]}" for n in missing[:5])
            raise FileNotFoundError(f"{name} {split}: {len(missing)} of {len(paths)} images are "
                                    f"missing under {root}, e.g.\n{eg}\nDownload them, or pass "
                                    f"skip_missing=True (--skip-missing) to drop their triplets.")
        if missing:
            gone = set(missing)
            images = [n for n in images if n not in gone]
            whole = not train and any(t["members"] for t in triplets)  # queries rank whole subsets
            keep = [i for i, t in enumerate(triplets) if gone.isdisjoint(
                (t["reference"], t["target"], *(t["members"] or () if whole else ())))]
            log(f"{name} {split}: skip_missing: {len(missing)} missing images dropped from the "
                f"gallery ({len(images)} left); {len(triplets) - len(keep)} of {len(triplets)} "
                f"triplets dropped because their reference"
                f"{', target or a subset member' if whole else ' or target'} is missing", once=True)
            triplets, field = [triplets[i] for i in keep], [field[i] for i in keep]
            if not images or not triplets:
                raise FileNotFoundError(f"{name} {split}: nothing left after dropping missing "
                                        f"images under {root}")
        self.images, self.paths = images, {n: paths[n] for n in images}
        self.index = {n: i for i, n in enumerate(images)}
        if noise is not None and noise.ratio:  # injected on top of the data's own: training only
            if not train:
                raise ValueError(f"{name}: injected noise is for the training split, not {split!r}")
            check_noise(noise, has_subsets=any(t["members"] for t in triplets))
            clean, (triplets, injected) = triplets, inject_noise(triplets, images, noise)
            field = [_field(t, t0) if hit else f
                     for t, t0, hit, f in zip(triplets, clean, injected.tolist(), field)]
            log(f"{name} {split}: --noise {noise.ratio}: {noise.kind} noise injected into "
                f"{int(injected.sum())} of {len(triplets)} triplets, in memory (seed {noise.seed}; "
                f"--noise 0: none; no file is changed)", once=True)
        if extra_triplets is not None:  # generated positives (SPN), after the noise: never noisy
            extra = _read_extra(extra_triplets, self.index, name)
            triplets, field = triplets + extra, field + [0] * len(extra)
            src = extra_triplets if isinstance(extra_triplets, (str, Path)) else "a list"
            log(f"{name} {split}: {len(extra)} extra triplets appended from {src}", once=True)
        self.triplets, self.noise_field = triplets, torch.tensor(field, dtype=torch.long)  # (N,)
        self.noisy = self.noise_field > 0                                                  # (N,)
        self.ref_idx = torch.tensor([self.index[t["reference"]] for t in triplets],       # (N,)
                                    dtype=torch.long)
        self.tgt_idx = torch.tensor([-1 if t["target"] is None else self.index[t["target"]]  # (N,)
                                     for t in triplets], dtype=torch.long)

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, i):
        return int(self.ref_idx[i]), self._text(self.triplets[i]), int(self.tgt_idx[i]), i

    def _text(self, t):
        return t["text"]

def _read_extra(extra, index, name):
    """Extra training triplets: a JSON file or a list of {reference, target, text|caption}."""
    rows = json.loads(Path(extra).read_text()) if isinstance(extra, (str, Path)) else extra
    out = [make_triplet(r.get("reference"), r.get("target"), r.get("text", r.get("caption")),
                        category=r.get("category")) for r in rows]
    for r, t in zip(rows, out):
        if t["reference"] not in index or t["target"] not in index or t["text"] is None:
            raise ValueError(f"{name}: extra triplet {r} needs 'reference' and 'target' among the "
                             f"training images and a 'text' (file: {extra})")
    return out

def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download it") from None

def load_image(path):
    """PIL RGB image; a missing or corrupt file raises one error naming its path."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # decodes here, so that a truncated file fails now
    except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
        raise OSError(f"cannot read image {path}: {type(e).__name__}: {e}. Replace the file, or "
                      f"delete it and build the dataset with skip_missing=True "
                      f"(--skip-missing)") from e

def find_missing(paths):
    """Names of `paths` ({name: Path}) whose file does not exist, in order; one scandir a folder."""
    @functools.cache
    def listed(folder):
        try:
            with os.scandir(folder) as it:
                return {e.name for e in it}
        except (FileNotFoundError, NotADirectoryError):
            return set()
    return [n for n, p in paths.items() if p.name not in listed(p.parent)]

# -----------------------------------------------------------------------------
# synthetic label noise

NOISE_KINDS = ("shuffle", "target", "text", "partial")
NOISE_FIELDS = ("clean", "reference", "text", "target")     # what a noisy triplet had replaced

class Noise(NamedTuple):
    """Injected training noise: `ratio` of the triplets corrupted the `kind` way, with `seed`."""
    ratio: float
    kind: str = "shuffle"
    seed: int = 0

def check_noise(noise, has_subsets=True, what="--noise"):
    """A clear error for a noise setting that cannot work, before any data is read."""
    if not 0.0 <= noise.ratio <= 1.0:
        raise ValueError(f"{what} {noise.ratio}: the fraction of corrupted training triplets "
                         f"must be in [0, 1]")
    if noise.kind not in NOISE_KINDS:
        raise ValueError(f"--noise-kind {noise.kind!r}: choose one of {', '.join(NOISE_KINDS)}")
    if noise.kind == "partial" and not has_subsets:
        raise ValueError("--noise-kind partial draws the wrong target from the query's subset, "
                         "and this dataset has none (CIRR and the toy do); choose shuffle, target "
                         "or text")

def inject_noise(triplets, images, noise):
    """Corrupt round(ratio * N) of N training triplets, drawn with noise.seed -> (new triplets,
    noisy (N,) bool); the input is not changed.
      shuffle  the field's protocol (TME, CVPR 2025; ConeSep, HABIT, INTENT): the chosen, in draw
               order, cut in thirds: the references shuffled within the first, the texts (with
               captions) within the second, the targets within the last; one left as it was (a
               fixed point, an equal value) is clean
      target   another image (not its target or reference) as target
      text     another triplet's (different) text
      partial  a near miss: another member of its subset as target; none: the triplet is not drawn
    """
    check_noise(noise)
    new, rng = list(triplets), random.Random(noise.seed)
    pool = [i for i, t in enumerate(triplets) if noise.kind != "partial" or _near_misses(t)]
    if noise.kind == "partial" and not pool and noise.ratio > 0:
        raise ValueError("--noise-kind partial needs subsets (img_set members) with a third image")
    k = min(round(noise.ratio * len(triplets)), len(pool))
    if k and noise.kind in ("target", "text") and len(set(images)) < 3:
        raise ValueError("inject_noise needs at least 3 distinct images")
    chosen = rng.sample(pool, k)
    if noise.kind == "shuffle":
        cut = [0, k // 3, 2 * k // 3, k]                # TME's cuts: the last third takes the rest
        for j, fields in enumerate((("reference",), ("text", "captions"), ("target",))):
            part, perm = chosen[cut[j]:cut[j + 1]], chosen[cut[j]:cut[j + 1]]
            rng.shuffle(perm)
            for i, o in zip(part, perm):
                new[i] = {**triplets[i], **{f: triplets[o][f] for f in fields}}
    else:
        for i in sorted(chosen):
            new[i] = {**triplets[i], **_corrupt(triplets[i], noise.kind, triplets, images, rng)}
    return new, torch.tensor([_field(t, t0) > 0 for t, t0 in zip(new, triplets)], dtype=torch.bool)

def _field(t, t0):
    """Which field of triplet t0 the noise changed in t: an index into NOISE_FIELDS."""
    return next((i for i, f in enumerate(NOISE_FIELDS) if i and t.get(f) != t0.get(f)), 0)

def _near_misses(t):
    return [m for m in (t.get("members") or ()) if m not in (t["reference"], t["target"])]

def _corrupt(t, kind, triplets, images, rng):
    """The replaced fields of one triplet under a per-triplet kind (rejection sampling: quick)."""
    if kind == "partial":
        return {"target": rng.choice(_near_misses(t))}
    if kind == "text":
        for _ in range(1000):
            o = triplets[rng.randrange(len(triplets))]
            if o["text"] != t["text"]:
                return {"text": o["text"], "captions": o["captions"]}
        return {}                                       # every text is the same: nothing to corrupt
    while True:
        cand = images[rng.randrange(len(images))]
        if cand != t["target"] and cand != t["reference"]:
            return {"target": cand}

# -----------------------------------------------------------------------------
# the plain triplet format: your own data

FORMAT_KEYS = ("reference", "text", "target")      # every row's; a test split may leave target out
OPTIONAL_KEYS = ("subset", "id", "noisy")
FORMAT_SPLITS = ("train", "val", "test")

class Triplets(TripletDataset):
    """Your own (--dataset triplets): DIR/<split>.jsonl or .csv, or `file`. A row: reference, text,
    target (paths relative to DIR); subset (paths; CSV: joined by |): Recall_subset, group batches,
    partial noise; id (default: the row number); noisy (true, or the replaced field): known noise
    (--oracle, the detection's score); other keys kept. The gallery: images by first use. Repeats
    kept once, self-pairs (as in Shoes) kept, both counted; a bad row: one line, file, row, key."""

    def __init__(self, root, split="train", file=None, **opts):
        root = Path(root).expanduser()
        if split not in FORMAT_SPLITS:
            raise ValueError(f"Triplets: split must be one of {FORMAT_SPLITS}, got {split!r}")
        path = Path(file).expanduser() if file else next(
            (p for p in (root / f"{split}.jsonl", root / f"{split}.csv") if p.is_file()), None)
        if path is None or not path.is_file():
            raise FileNotFoundError(f"Triplets: no {file or f'{split}.jsonl or {split}.csv'} in "
                                    f"{root}: write one row per triplet with reference, text, "
                                    f"target (image paths relative to the folder)")
        rows, kept = read_rows(path), {}
        for r, row in rows:                             # a repeated row: kept once
            t, field = _parse_row(row, path, r, split)
            kept.setdefault((t["reference"], t["text"], t["target"], tuple(t["members"] or ())),
                            (t, field))
        if not kept:
            raise ValueError(f"{path}: no triplet; write one JSON object per line with reference, "
                             f"text, target")
        triplets, field = [t for t, _ in kept.values()], [f for _, f in kept.values()]
        uses = [(t, k, n) for t in triplets for k, n in (("reference", t["reference"]),
                ("target", t["target"]), *(("subset", m) for m in t["members"] or ()))]
        paths = {n: root / n for _, _, n in uses if n is not None}  # the gallery, by first use
        missing = set() if opts.get("skip_missing") else set(find_missing(paths))
        if bad := next((u for u in uses if u[2] in missing), None):
            raise FileNotFoundError(f"{path} row {bad[0]['line']}, key '{bad[1]}': {bad[2]} does "
                                    f"not exist under {root}; add the image, or pass "
                                    f"skip_missing=True (--skip-missing) to drop the triplets "
                                    f"that use missing images")
        self.n_repeated = len(rows) - len(triplets)
        self.n_self_pairs = sum(t["reference"] == t["target"] for t in triplets)
        log(f"Triplets {split}: {path}: {len(triplets)} triplets ({self.n_self_pairs} with "
            f"reference = target) over {len(paths)} images"
            + (f"; {self.n_repeated} repeated rows kept once" if self.n_repeated else ""),
            once=True)
        self._setup("Triplets", root, split, (list(paths), paths, triplets, field), **opts)

def read_rows(path):
    """[(row number from 1, dict)] of a .jsonl (an object a line; blank lines skipped) or .csv."""
    text = Path(path).read_text()
    if Path(path).suffix == ".csv":
        return list(enumerate(map(dict, csv.DictReader(io.StringIO(text))), start=1))
    out = []
    for r, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row, why = json.loads(line), ""
        except json.JSONDecodeError as e:
            row, why = None, f" ({e.msg})"
        if not isinstance(row, dict):
            raise ValueError(f"{path} row {r}: not a JSON object{why}; one triplet per line")
        out.append((r, row))
    return out

def _parse_row(row, path, r, split):
    """One row of the format -> (triplet, its stored noise: a NOISE_FIELDS index). A test split may
    leave the target out; a validation subset must hold its target (Recall_subset)."""
    at, need = f"{path} row {r}", "every row needs reference, text and target"
    if absent := [k for k in FORMAT_KEYS[:2 if split == "test" else 3] if row.get(k) is None]:
        raise ValueError(f"{at}: no '{absent[0]}'; {need}")
    if not (text := str(row["text"]).strip()):
        raise ValueError(f"{at}: an empty 'text'; {need}")
    if not str(row["reference"]) or split != "test" and not str(row["target"]):
        raise ValueError(f"{at}: an empty image path; {need}")
    target = str(row["target"]) if row.get("target") not in (None, "") else None
    members = row.get("subset")
    if isinstance(members, str):                        # CSV: joined by |
        members = [m for m in members.split("|") if m] or None
    if members is not None and not (isinstance(members, list)
                                    and all(isinstance(m, str) for m in members)):
        raise ValueError(f"{at}: 'subset' must be a list of image paths")
    if members is not None and split != "train" and target is not None and target not in members:
        raise ValueError(f"{at}, key 'subset': the subset does not hold the target {target}")
    noisy = row.get("noisy", False)
    if isinstance(noisy, str) and noisy.lower() in ("", "false", "0", "true", "1"):
        noisy = noisy.lower() in ("true", "1")
    if noisy not in (True, False) and noisy not in NOISE_FIELDS[1:]:
        raise ValueError(f"{at}, key 'noisy': {noisy!r}; true, false or the replaced field "
                         f"({', '.join(NOISE_FIELDS[1:])})")
    other = {k: v for k, v in row.items() if k not in FORMAT_KEYS + OPTIONAL_KEYS}
    t = make_triplet(str(row["reference"]), target, text, pairid=row.get("id", r), members=members,
                     category=other.get("category"), row=other, source=row, line=r)
    noisy = noisy if isinstance(noisy, str) else "target" if noisy else "clean"  # true: a target
    return t, NOISE_FIELDS.index(noisy)

def as_row(t, field=0, name=lambda n: n):
    """A triplet as a row of the format (field: its NOISE_FIELDS index; captions: only a pair not
    [text], FashionIQ's; then the row's other keys); `name` maps an image name to its path."""
    row = dict(reference=name(t["reference"]), text=t["text"],
               target=None if t["target"] is None else name(t["target"]),
               subset=[name(m) for m in t["members"]] if t["members"] else None, id=t["pairid"],
               noisy=NOISE_FIELDS[field] if field else None, category=t["category"],
               captions=t["captions"] if t["captions"] != [t["text"]] else None)
    return {**{k: v for k, v in row.items() if v is not None}, **t["row"]}
