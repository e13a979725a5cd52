"""A split of composed-retrieval triplets as a dataset, the ground truth of its noise, injected noise, and the plain
triplet format for your own data.

- TripletDataset: what every dataset is (CIRR, FashionIQ, Shoes in data.py, the toy in CIRR's layout): .triplets,
  .images (the split's gallery), item i = (ref index, text, target index, i) on every split; images are read by
  index (encode.ImageSource). Missing images are found once, when a dataset is built (one directory listing per
  folder, no image opened): an error by default, or with skip_missing=True the affected triplets (and gallery
  images) are dropped, with a printed count. A corrupt image fails when read, naming its path.
- inject_noise: corrupt round(p*N) training triplets (Noise(ratio, kind, seed)): the field's "shuffle" protocol,
  a random wrong target, a wrong text, or a near-miss target from the query's own subset; the flags (.noisy, and
  which field: .noise_field) are the ground truth against which the noise filter's detection is scored.
- Triplets: your own triplets, <root>/{train,val,test}.jsonl (or .csv), one row per triplet: reference, text,
  target (image paths relative to <root>), optionally subset (a list of image paths: CIRR's img_set), id, noisy
  (true, or the replaced field), any other key (kept, and carried into the audit).
"""
import csv
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

# -----------------------------------------------------------------------------
# images on disk

def load_image(path):
    """PIL RGB image; a missing or corrupt file raises one error naming its path."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() forces the decode here, so a truncated file fails now
    except Exception as e:  # PIL raises several types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise OSError(f"cannot read image {path}: {type(e).__name__}: {e}. Replace the file, or delete it and "
                      f"build the dataset with skip_missing=True (--skip-missing)") from e


def _listdir(folder):
    """Names in a folder (a set; empty if the folder does not exist). One scandir: no per-file stat."""
    try:
        with os.scandir(folder) as it:
            return {e.name for e in it}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def find_missing(paths):
    """Names of `paths` ({name: Path}) whose file does not exist, in dict order. One listing per parent folder."""
    listings = {}
    missing = []
    for name, p in paths.items():
        parent = p.parent
        if parent not in listings:
            listings[parent] = _listdir(parent)
        if p.name not in listings[parent]:
            missing.append(name)
    return missing


def _missing_message(what, missing, paths, root):
    eg = "\n".join(f"  {n}: {paths[n]}" for n in missing[:5])
    return (f"{what}: {len(missing)} of {len(paths)} images are missing under {root}, e.g.\n{eg}\n"
            f"Download them, or pass skip_missing=True (--skip-missing) to drop the triplets that use them.")


# -----------------------------------------------------------------------------
# synthetic label noise

NOISE_KINDS = ("shuffle", "target", "text", "partial")
NOISE_FIELDS = ("clean", "reference", "text", "target")     # what a noisy triplet had replaced


class Noise(NamedTuple):
    """Injected training noise: `ratio` of the triplets corrupted the `kind` way, chosen with `seed`."""
    ratio: float
    kind: str = "shuffle"
    seed: int = 0


def check_noise(noise, has_subsets=True, what="--noise"):
    """A clear error for a noise setting that cannot work, before any data is read."""
    if not 0.0 <= noise.ratio <= 1.0:
        raise ValueError(f"{what} {noise.ratio}: the fraction of corrupted training triplets must be in [0, 1]")
    if noise.kind not in NOISE_KINDS:
        raise ValueError(f"--noise-kind {noise.kind!r}: choose one of {', '.join(NOISE_KINDS)}")
    if noise.kind == "partial" and not has_subsets:
        raise ValueError("--noise-kind partial draws the wrong target from the query's own subset, and this dataset "
                         "has none (CIRR and the toy do); choose --noise-kind shuffle, target or text")


def inject_noise(triplets, images, noise):
    """Corrupt round(ratio * N) of N training triplets, chosen with noise.seed. Returns (new_triplets, noisy (N,)
    bool); the input is not modified, and ratio 0 returns the same triplet objects and all-False flags.

      shuffle  the field's protocol (TME, CVPR 2025; ConeSep, HABIT and INTENT use the same): the chosen triplets,
               in the random order they were drawn, are cut into three equal parts; within the first the reference
               images are shuffled among them, within the second the modification texts (FashionIQ: the caption
               pair as one), within the third the target images. A triplet the shuffle leaves unchanged (a fixed
               point, or an equal value: references repeat) counts as clean, so at most round(ratio * N) are
               noisy. TME keeps no flags; here they are the ground truth the noise filter is scored against.
      target   each chosen triplet gets a random other image of `images` as target (never its target or reference)
      text     each chosen triplet gets the modification text of a random other triplet (a different text)
      partial  a near miss: the target is replaced by another image of the triplet's own subset ("members": CIRR's
               img_set, the toy's group), never its reference or target; triplets without such an image are not
               chosen
    """
    check_noise(noise)
    n = len(triplets)
    noisy = torch.zeros(n, dtype=torch.bool)
    new = list(triplets)
    rng = random.Random(noise.seed)
    pool = list(range(n))
    if noise.kind == "partial":
        pool = [i for i, t in enumerate(triplets) if _near_misses(t)]
        if not pool and noise.ratio > 0:
            raise ValueError("--noise-kind partial needs subsets (img_set members) with a third image")
    k = min(round(noise.ratio * n), len(pool))
    if k == 0:
        return new, noisy
    chosen = rng.sample(pool, k)
    if noise.kind == "shuffle":
        cut = [0, k // 3, 2 * k // 3, k]                    # TME's cuts: the last third takes the remainder
        parts = [chosen[cut[j]:cut[j + 1]] for j in range(3)]
        for part, fields in zip(parts, (("reference",), ("text", "captions"), ("target",))):
            perm = part[:]
            rng.shuffle(perm)
            for i, j in zip(part, perm):
                new[i] = {**triplets[i], **{f: triplets[j][f] for f in fields}}
    else:
        if noise.kind in ("target", "text") and len(set(images)) < 3:
            raise ValueError("inject_noise needs at least 3 distinct images")
        for i in sorted(chosen):
            new[i] = {**triplets[i], **_corrupt(triplets[i], noise.kind, triplets, images, rng)}
    for i in chosen:
        noisy[i] = any(new[i].get(f) != triplets[i].get(f) for f in ("reference", "text", "target"))
    return new, noisy


def _field(t, t0):
    """Which field of triplet t0 the noise changed in t: an index into NOISE_FIELDS."""
    return next((i for i, f in enumerate(NOISE_FIELDS) if i and t.get(f) != t0.get(f)), 0)


def _near_misses(t):
    return [m for m in (t.get("members") or ()) if m not in (t["reference"], t["target"])]


def _corrupt(t, kind, triplets, images, rng):
    """The replaced fields of one triplet under a per-triplet noise kind (rejection sampling ends quickly)."""
    if kind == "partial":
        return {"target": rng.choice(_near_misses(t))}
    if kind == "text":
        for _ in range(1000):
            o = triplets[rng.randrange(len(triplets))]
            if o["text"] != t["text"]:
                return {"text": o["text"], "captions": o["captions"]}
        return {}                                           # every text is the same: nothing to corrupt
    while True:
        cand = images[rng.randrange(len(images))]
        if cand != t["target"] and cand != t["reference"]:
            return {"target": cand}


# -----------------------------------------------------------------------------
# the dataset of a split

class TripletDataset(Dataset):
    """A split of a composed-retrieval dataset (CIRR, FashionIQ, Shoes, the toy): .triplets (dicts), .images (every
    image of the split, in split-file order: the gallery), .paths {name: Path}, .index {name: row of .images},
    .ref_idx / .tgt_idx (n,) rows of .images (-1: no target, on a test split), .noisy / .noise_field (n,) the ground
    truth of injected noise. Item i is (ref_idx, text, tgt_idx, i) on every split: images are read by their index
    (encode.ImageSource), names and subsets are in .triplets. FashionIQ's training split draws one of the caption
    combinations at each access (its _text)."""

    def _setup(self, name, root, split, found, skip_missing=False, noise=None, extra_triplets=None):
        """found: what the dataset's layout gave (images, {name: path}, triplets, the stored noise flags)."""
        images, paths, triplets, stored_noisy = found
        self.split = split
        train = split == "train"

        # Missing images: one listing per folder. Default: a clear error. skip_missing: drop and report.
        missing = find_missing({n: paths[n] for n in images})
        if missing:
            if not skip_missing:
                raise FileNotFoundError(_missing_message(f"{name} {split}", missing, paths, root))
            gone = set(missing)
            images = [n for n in images if n not in gone]
            # Evaluation needs the whole subset (every query ranks the same number of members); training does not.
            subsets = not train and any(t["members"] for t in triplets)
            uses = (lambda t: (t["reference"], t["target"], *(t["members"] or ()))) if subsets else \
                (lambda t: (t["reference"], t["target"]))
            keep = [i for i, t in enumerate(triplets) if not any(n in gone for n in uses(t))]
            log(f"{name} {split}: skip_missing: {len(missing)} missing images dropped from the gallery "
                f"({len(images)} left); {len(triplets) - len(keep)} of {len(triplets)} triplets dropped "
                f"because their reference{', target or a subset member' if subsets else ' or target'} is missing", once=True)
            triplets = [triplets[i] for i in keep]
            stored_noisy = [stored_noisy[i] for i in keep]
            if not images or not triplets:
                raise FileNotFoundError(f"{name} {split}: nothing left after dropping missing images under {root}")
        self.images = images
        self.index = {n: i for i, n in enumerate(images)}
        self.paths = {n: paths[n] for n in images}

        # Injected noise (training only), on top of any noise the data set stores itself (the toy's "noisy" key: a
        # replaced target; the triplet format's: true or the replaced field's name)
        field = torch.tensor([NOISE_FIELDS.index("target") if f is True else int(f) for f in stored_noisy],
                             dtype=torch.long)
        noisy = field > 0
        if noise is not None and noise.ratio:
            if not train:
                raise ValueError(f"{name}: injected noise is for the training split, not {split!r}")
            check_noise(noise, has_subsets=any(t["members"] for t in triplets))
            clean, (triplets, injected) = triplets, inject_noise(triplets, images, noise)
            field = torch.where(injected, torch.tensor([_field(t, t0) for t, t0 in zip(triplets, clean)]), field)
            log(f"{name} {split}: --noise {noise.ratio}: {noise.kind} noise injected into {int(injected.sum())} of "
                f"{len(triplets)} triplets, in memory (seed {noise.seed}; --noise 0: none; no file is changed)", once=True)
            noisy = noisy | injected
        if extra_triplets is not None:  # generated positives (SPN), appended after the noise: never corrupted
            extra = _read_extra(extra_triplets, self.index, name)
            triplets = triplets + extra
            noisy = torch.cat([noisy, torch.zeros(len(extra), dtype=torch.bool)])
            field = torch.cat([field, torch.zeros(len(extra), dtype=torch.long)])
            src = extra_triplets if isinstance(extra_triplets, (str, Path)) else "a list"
            log(f"{name} {split}: {len(extra)} extra triplets appended from {src}", once=True)
        self.triplets = triplets
        self.noisy = noisy                                       # (N,) bool, the ground truth of the noise
        self.noise_field = field                                 # (N,) index into NOISE_FIELDS: what was corrupted
        self.ref_idx = torch.tensor([self.index[t["reference"]] for t in triplets], dtype=torch.long)  # (N,)
        self.tgt_idx = torch.tensor([self.index[t["target"]] if t["target"] is not None else -1
                                     for t in triplets], dtype=torch.long)                          # (N,)

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, i):
        return int(self.ref_idx[i]), self._text(self.triplets[i]), int(self.tgt_idx[i]), i

    def _text(self, t):
        return t["text"]


def _read_extra(extra, index, name):
    """Extra training triplets: a JSON file (or a list) of {reference, target, text|caption}; names must be
    training images."""
    rows = json.loads(Path(extra).read_text()) if isinstance(extra, (str, Path)) else extra
    out = []
    for r in rows:
        text = r.get("text", r.get("caption"))
        if r.get("reference") not in index or r.get("target") not in index or text is None:
            raise ValueError(f"{name}: extra triplet {r} needs 'reference' and 'target' among the training images "
                             f"and a 'text' (file: {extra})")
        out.append(dict(reference=r["reference"], target=r["target"], text=text, captions=[text], members=None,
                        pairid=None, category=r.get("category")))
    return out


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download it") from None


def subset_rows(ds):
    """(n, M) gallery rows of each triplet's subset (CIRR's img_set, the toy's group): its target first, then the
    other members but its reference, -1 padding; None when a triplet has no subset (FashionIQ, Shoes)."""
    if not ds.triplets or not all(t.get("members") for t in ds.triplets):
        return None
    rows = [list(dict.fromkeys([t["target"], *(m for m in t["members"] if m != t["reference"])]))
            for t in ds.triplets]
    width = max(map(len, rows))
    return torch.tensor([[ds.index[m] for m in r] + [-1] * (width - len(r)) for r in rows])


# -----------------------------------------------------------------------------
# the plain triplet format: your own data

FORMAT_KEYS = ("reference", "text", "target")          # every row's; a test split may leave target out
OPTIONAL_KEYS = ("subset", "id", "noisy")
FORMAT_SPLITS = ("train", "val", "test")


class Triplets(TripletDataset):
    """Your own triplets (--dataset triplets --data-root DIR): DIR/<split>.jsonl, or .csv, or `file`. A JSON-lines
    row (or CSV row with these columns) holds reference, text and target, image paths relative to DIR; subset (a
    list of image paths; CSV: separated by |) enables Recall_subset, whole-group batches and partial noise; id names
    the triplet (default: its row number, from 1); noisy (true, or the replaced field: reference / text / target)
    marks known noise, for --oracle and the detection's score; other keys are kept in .triplets[i]["row"], and the
    row as read in ["source"] (its line in ["line"]): the audit's cleaned copy writes these rows, never a changed one. The
    gallery of a split is every image its rows name, in the order they first appear. A repeated row is kept once and
    counted, a row whose reference is its target kept and counted (as Shoes); a missing key, an empty text, an image
    that does not exist (without skip_missing) or a validation subset without its target is one line naming file,
    row and key."""

    def __init__(self, root, split="train", skip_missing=False, noise=None, extra_triplets=None, file=None):
        root = Path(root).expanduser()
        if split not in FORMAT_SPLITS:
            raise ValueError(f"Triplets: split must be one of {FORMAT_SPLITS}, got {split!r}")
        path = Path(file).expanduser() if file else next(
            (root / f"{split}{e}" for e in (".jsonl", ".csv") if (root / f"{split}{e}").is_file()), None)
        if path is None or not path.is_file():
            raise FileNotFoundError(f"Triplets: no {file or f'{split}.jsonl or {split}.csv'} in {root}: write one row "
                                    "per triplet with reference, text, target (image paths relative to the folder)")
        triplets, stored, paths, seen = [], [], {}, set()
        repeated = self_pairs = 0
        for r, row in read_rows(path):
            t, field = _parse_row(row, path, r, split)
            key = (t["reference"], t["text"], t["target"], tuple(t["members"] or ()))
            if key in seen:
                repeated += 1
                continue
            seen.add(key)
            self_pairs += t["reference"] == t["target"]
            triplets.append(t)
            stored.append(field)
            for k, n in (("reference", t["reference"]), ("target", t["target"]), *(("subset", m) for m in
                                                                                  t["members"] or ())):
                if n is not None and n not in paths:
                    paths[n] = root / n
                    if not skip_missing and not paths[n].is_file():
                        raise FileNotFoundError(f"{path} row {r}, key '{k}': {n} does not exist under {root}; add "
                                                "the image, or pass skip_missing=True (--skip-missing) to drop the "
                                                "triplets that use missing images")
        if not triplets:
            raise ValueError(f"{path}: no triplet; write one JSON object per line with reference, text, target")
        log(f"Triplets {split}: {path}: {len(triplets)} triplets ({self_pairs} with reference = target) over "
            f"{len(paths)} images" + (f"; {repeated} repeated rows kept once" if repeated else ""), once=True)
        self.n_self_pairs, self.n_repeated = self_pairs, repeated
        self._setup("Triplets", root, split, (list(paths), paths, triplets, stored), skip_missing, noise,
                    extra_triplets)


def read_rows(path):
    """[(row number from 1, dict)] of a .jsonl (one JSON object per line; blank lines skipped) or .csv file."""
    text = Path(path).read_text()
    if Path(path).suffix == ".csv":
        return [(r, dict(row)) for r, row in enumerate(csv.DictReader(io.StringIO(text)), start=1)]
    out = []
    for r, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} row {r}: not a JSON object ({e.msg}); one triplet per line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} row {r}: not a JSON object; one triplet per line")
        out.append((r, row))
    return out


def _parse_row(row, path, r, split):
    """One row of the format -> (triplet dict, its stored noise: False or a NOISE_FIELDS index). A test split may
    leave the target out; a validation row's subset must hold its target (Recall_subset ranks it there)."""
    need_target = split != "test"
    for k in FORMAT_KEYS if need_target else FORMAT_KEYS[:2]:
        if k not in row or row[k] is None:
            raise ValueError(f"{path} row {r}: no '{k}'; every row needs reference, text and target")
    text = str(row["text"]).strip()
    if not text:
        raise ValueError(f"{path} row {r}: an empty 'text'; every row needs reference, text and target")
    if not str(row["reference"]) or need_target and not str(row["target"]):
        raise ValueError(f"{path} row {r}: an empty image path; every row needs reference, text and target")
    target = str(row["target"]) if row.get("target") not in (None, "") else None
    members = row.get("subset")
    if isinstance(members, str):
        members = [m for m in members.split("|") if m] if members else None
    if members is not None:
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ValueError(f"{path} row {r}: 'subset' must be a list of image paths")
        if split != "train" and target is not None and target not in members:
            raise ValueError(f"{path} row {r}, key 'subset': the subset does not hold the target {target}")
    noisy = row.get("noisy", False)
    if isinstance(noisy, str) and noisy.lower() in ("", "false", "0", "true", "1"):
        noisy = noisy.lower() in ("true", "1")
    if noisy not in (True, False) and noisy not in NOISE_FIELDS[1:]:
        raise ValueError(f"{path} row {r}, key 'noisy': {noisy!r}; true, false or the replaced field "
                         f"({', '.join(NOISE_FIELDS[1:])})")
    field = NOISE_FIELDS.index(noisy) if isinstance(noisy, str) else noisy
    keep = {k: v for k, v in row.items() if k not in FORMAT_KEYS + OPTIONAL_KEYS}
    t = dict(pairid=row.get("id", r), reference=str(row["reference"]), target=target, text=text, captions=[text],
             members=members, category=keep.get("category"), row=keep, source=row, line=r)
    return t, field


def as_row(t, field=0, name=lambda n: n):
    """A triplet (dict) as a row of the format: reference, text, target, subset, id, its noise (field: a
    NOISE_FIELDS index, 0 for clean), its other keys; name maps image names to the paths the row holds."""
    row = dict(reference=name(t["reference"]), text=t["text"])
    if t["target"] is not None:
        row["target"] = name(t["target"])
    if t.get("members"):
        row["subset"] = [name(m) for m in t["members"]]
    if t.get("pairid") is not None:
        row["id"] = t["pairid"]
    if field:
        row["noisy"] = NOISE_FIELDS[field]
    return {**row, **t.get("row", {})}
