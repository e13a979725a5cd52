"""Data: CIRR, FashionIQ and Shoes read from their official on-disk layouts, synthetic label noise, and the bundled
toy benchmark (README: "Data").

- CIRR rc2: <root>/captions/cap.rc2.{train,val,test1}.json, <root>/image_splits/split.rc2.{split}.json
  ({name: "./dev/dev-244-0-img0.png"}, relative to the image root). Recognised variants: the CIRR release
  (images under <root>/img_raw/), CLIP4Cir's copy (annotations under <root>/cirr/, images beside it), and the
  flat layout of the toy benchmark (images beside captions/).
- FashionIQ: <root>/captions/cap.{cat}.{split}.json (list of {candidate, target, captions[2]}; test: no target),
  <root>/image_splits/split.{cat}.{split}.json (list of names), images <root>/images/<name>.png or .jpg.
- Shoes: <root>/relative_captions_shoes.json (list of {ImageName (target), ReferenceImageName, RelativeCaption}),
  <root>/train_im_names.txt and eval_im_names.txt (the splits "train" and "test"), also in <root>/dataset/; images
  found by file name below <root>: the Attribute Discovery archive's womens_<category>/<0|1>/<name>.jpg, possibly
  under one more folder (attributedata/), or a flat folder.
- Two views of a split: "triplets" (the queries) and "gallery" (every image of the split, in split-file order).
  The image list (.images) is the same in both views, so indices of one are valid in the other.
- Missing images are found once, when a dataset is built (one directory listing per folder, no image opened):
  an error by default, or with skip_missing=True the affected triplets (and gallery images) are dropped, with a
  printed count. A corrupt image fails when read, naming its path.
- inject_noise: corrupt round(p*N) training triplets (Noise(ratio, kind, seed)): the field's "shuffle" protocol,
  a random wrong target, a wrong text, or a near-miss target from the query's own subset; the flags (.noisy) are
  the ground truth against which the noise filter's detection is scored.
- The toy benchmark (toy.py) is written in CIRR's layout, so the CIRR class reads it unchanged.
"""
import json
import os
import random
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_tensor

IMAGE_EXTS = (".png", ".jpg", ".jpeg")  # FashionIQ copies use .png or .jpg; the first found wins in this order
CIRR_SPLITS = ("train", "val", "test1")
FIQ_SPLITS = ("train", "val", "test")
FIQ_CATEGORIES = ("dress", "shirt", "toptee")


_SAID = set()


def say(message):
    """Print a message once per process: a dataset is built several times (views, splits, the study's cells), and
    its layout or noise line says the same each time."""
    if message not in _SAID:
        _SAID.add(message)
        print(message, flush=True)


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


def decode_images(gallery, workers=0, batch_size=256):
    """Every image of a gallery view decoded once: (N, 3, H, W) uint8 in .images order. The view's transform must
    end in uint8 (model.make_transform(..., pixels=True)); model.normalize_pixels turns rows into model input.
    A decoded-image cache: training and validation then never open a file again (the toy's 7,200 64-px training
    images are 88 MB)."""
    loader = DataLoader(gallery, batch_size=batch_size, num_workers=workers)
    pixels = torch.cat([x for _, x in loader])
    if pixels.dtype != torch.uint8:
        raise ValueError("decode_images needs a uint8 transform: model.make_transform(..., pixels=True)")
    return pixels


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
# the datasets

def fiq_text(captions):
    """FashionIQ evaluation text: "c0 and c1", each caption stripped of '.?, ' (an empty caption is left out)."""
    cs = [c.strip(".?, ") for c in captions]
    return " and ".join(c for c in cs if c)


def fiq_random_text(captions):
    """FashionIQ training text: one of "c0 and c1", "c1 and c0", "c0", "c1" uniformly (torch RNG, so DataLoader
    workers and torch.manual_seed govern it)."""
    cs = [c.strip(".?, ") for c in captions]
    cs = [c for c in cs if c] or [""]
    if len(cs) == 1:
        return cs[0]
    c0, c1 = cs[0], cs[1]
    return (f"{c0} and {c1}", f"{c1} and {c0}", c0, c1)[int(torch.randint(4, ()))]


def eval_collate(batch):
    """DataLoader collate for evaluation-split triplet items (ref_name, text, tgt_name, members, i):
    -> (list[str], list[str], list[str], list[list[str]], LongTensor (B,))."""
    ref, text, tgt, members, idx = zip(*batch)
    return list(ref), list(text), list(tgt), [list(m) for m in members], torch.tensor(idx)


class Options(NamedTuple):
    """How a split is read: the keyword arguments every dataset's constructor takes, in its order."""
    view: str = "triplets"                  # "triplets" or "gallery" (every image once)
    transform: object = None                # PIL image -> tensor; None: to_tensor
    skip_missing: bool = False              # drop missing images (and their triplets) instead of an error
    noise: object = None                    # Noise to inject into the training triplets
    return_images: bool = True              # triplets as images, or as indices into .images
    random_text: object = None              # FashionIQ: random caption order (None: on the training split)
    extra_triplets: object = None           # SPN's generated positives: a JSON file or a list


class _CIRDataset(Dataset):
    """Shared part of CIRR and FashionIQ: missing images, noise, indices, items.

    Items:
      view="gallery":                         i -> (i, image)                       name: .images[i]
      view="triplets", return_images=False:   i -> (ref_idx, text, tgt_idx, i)      idx into .images, -1 = no target
      view="triplets", training split:        i -> (ref_image, text, tgt_image, i)
      view="triplets", val/test split:        i -> (ref_name, text, tgt_name, members, i)
            tgt_name "" on test; members: the CIRR subset (tuple of 6 names), () for FashionIQ; batch with
            eval_collate. Evaluation takes image features from the gallery view by name (.index).
    text: FashionIQ training split randomises the caption combination (random_text=None means split == "train").
    """

    def _setup(self, name, root, split, found, o):
        """found: what the dataset's layout gave (images, {name: path}, triplets, the stored noise flags);
        o: the constructor's Options."""
        images, paths, triplets, stored_noisy = found
        if o.view not in ("triplets", "gallery"):
            raise ValueError(f"{name}: view must be 'triplets' or 'gallery', got {o.view!r}")
        self.split, self.view, self.transform = split, o.view, o.transform
        self.return_images = o.return_images
        self.random_text = (split == "train") if o.random_text is None else o.random_text
        train = split == "train"

        # Missing images: one listing per folder. Default: a clear error. skip_missing: drop and report.
        missing = find_missing({n: paths[n] for n in images})
        if missing:
            if not o.skip_missing:
                raise FileNotFoundError(_missing_message(f"{name} {split}", missing, paths, root))
            gone = set(missing)
            images = [n for n in images if n not in gone]
            # Evaluation needs the whole subset (every query ranks the same number of members); training does not.
            subsets = not train and any(t["members"] for t in triplets)
            uses = (lambda t: (t["reference"], t["target"], *(t["members"] or ()))) if subsets else \
                (lambda t: (t["reference"], t["target"]))
            keep = [i for i, t in enumerate(triplets) if not any(n in gone for n in uses(t))]
            say(f"{name} {split}: skip_missing: {len(missing)} missing images dropped from the gallery "
                f"({len(images)} left); {len(triplets) - len(keep)} of {len(triplets)} triplets dropped "
                f"because their reference{', target or a subset member' if subsets else ' or target'} is missing")
            triplets = [triplets[i] for i in keep]
            stored_noisy = [stored_noisy[i] for i in keep]
            if not images or not triplets:
                raise FileNotFoundError(f"{name} {split}: nothing left after dropping missing images under {root}")
        self.images = images
        self.index = {n: i for i, n in enumerate(images)}
        self.paths = {n: paths[n] for n in images}

        # Injected noise (training only), on top of any noise the data set stores itself (the toy's "noisy" key).
        noisy = torch.tensor(stored_noisy, dtype=torch.bool)
        field = noisy.long() * NOISE_FIELDS.index("target")       # the toy's own noise replaces targets
        noise = o.noise
        if noise is not None and noise.ratio:
            if not train:
                raise ValueError(f"{name}: injected noise is for the training split, not {split!r}")
            check_noise(noise, has_subsets=any(t["members"] for t in triplets))
            clean, (triplets, injected) = triplets, inject_noise(triplets, images, noise)
            field = torch.where(injected, torch.tensor([_field(t, t0) for t, t0 in zip(triplets, clean)]), field)
            say(f"{name} {split}: injected {noise.kind} noise: {int(injected.sum())} of {len(triplets)} triplets "
                f"corrupted (ratio {noise.ratio}, seed {noise.seed})")
            noisy = noisy | injected
        extra_triplets = o.extra_triplets
        if extra_triplets is not None:  # generated positives (SPN), appended after the noise: never corrupted
            extra = _read_extra(extra_triplets, self.index, name)
            triplets = triplets + extra
            noisy = torch.cat([noisy, torch.zeros(len(extra), dtype=torch.bool)])
            field = torch.cat([field, torch.zeros(len(extra), dtype=torch.long)])
            src = extra_triplets if isinstance(extra_triplets, (str, Path)) else "a list"
            say(f"{name} {split}: {len(extra)} extra triplets appended from {src}")
        self.triplets = triplets
        self.noisy = noisy                                       # (N,) bool, the ground truth of the noise
        self.noise_field = field                                 # (N,) index into NOISE_FIELDS: what was corrupted
        self.ref_idx = torch.tensor([self.index[t["reference"]] for t in triplets], dtype=torch.long)  # (N,)
        self.tgt_idx = torch.tensor([self.index[t["target"]] if t["target"] is not None else -1
                                     for t in triplets], dtype=torch.long)                          # (N,)

    def __len__(self):
        return len(self.images) if self.view == "gallery" else len(self.triplets)

    def _image(self, name):
        im = load_image(self.paths[name])
        return to_tensor(im) if self.transform is None else self.transform(im)

    def _text(self, t):
        return t["text"]

    def __getitem__(self, i):
        if self.view == "gallery":
            return i, self._image(self.images[i])
        t = self.triplets[i]
        text = self._text(t)
        if not self.return_images:
            return int(self.ref_idx[i]), text, int(self.tgt_idx[i]), i
        if self.split == "train":
            return self._image(t["reference"]), text, self._image(t["target"]), i
        return t["reference"], text, t["target"] or "", tuple(t["members"] or ()), i


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


def _first_dir(candidates, needed):
    """The first candidate folder holding all `needed` relative files, or None."""
    return next((d for d in candidates if all((d / f).is_file() for f in needed)), None)


def _unique(paths):
    out = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out


def _best_image_root(candidates, rel, sample=50):
    """The candidate image root where most of a sample of relative image paths exist (a few stats, no listing)."""
    probe = rel[:sample]
    hits = [sum((c / r).is_file() for r in probe) for c in candidates]
    best = max(range(len(candidates)), key=lambda i: (hits[i], -i))
    return candidates[best] if hits[best] else None


class CIRR(_CIRDataset):
    """CIRR rc2 (and the toy benchmark, written in the same layout).

    root: the folder given by --data-root. Annotations are looked for in <root> and <root>/cirr; images under
    <annotations>/img_raw, <annotations>, <root>/img_raw, <root> (the first that holds the split's images).
    triplets: dicts {pairid, reference, target (None on test1), text, captions [text], members (img_set.members,
    includes the reference), category None, subset (img_set.id)}. A caption row's "noisy" key (the toy's ground
    truth) fills .noisy.
    """

    def __init__(self, root, split="train", view="triplets", transform=None, skip_missing=False, noise=None,
                 return_images=True, random_text=None, extra_triplets=None):
        # random_text: no effect for CIRR (one caption per query); extra_triplets: see _read_extra
        root = Path(root).expanduser()
        if split not in CIRR_SPLITS:
            raise ValueError(f"CIRR: split must be one of {CIRR_SPLITS}, got {split!r}")
        cap, spl = f"captions/cap.rc2.{split}.json", f"image_splits/split.rc2.{split}.json"
        ann = _first_dir([root, root / "cirr"], [cap, spl])
        if ann is None:
            raise FileNotFoundError(
                f"CIRR: no annotations for split {split!r} under {root}: expected {cap} and {spl} in {root} (CIRR "
                f"release, toy) or in {root / 'cirr'} (CLIP4Cir's copy). Point --data-root at the dataset folder.")
        rel = _read_json(ann / spl)  # {name: "./dev/dev-244-0-img0.png"}
        if not isinstance(rel, dict):
            raise ValueError(f"{ann / spl}: expected a JSON object {{name: relative path}}")
        names = list(rel)
        cands = _unique([ann / "img_raw", ann, root / "img_raw", root])
        img_root = _best_image_root(cands, [rel[n] for n in names])
        if img_root is None:
            eg = rel[names[0]] if names else "?"
            raise FileNotFoundError(
                f"CIRR: annotations found in {ann}, but no {split} images: expected e.g. {eg} under one of "
                + ", ".join(str(c) for c in cands) + ". Point --data-root at the folder holding img_raw/ or dev/.")
        paths = {n: img_root / os.path.normpath(r) for n, r in rel.items()}
        say(f"CIRR {split}: {_cirr_layout(root, ann, img_root)}: annotations {ann}, images {img_root}")

        triplets, noisy = [], []
        for r in _read_json(ann / cap):
            tgt = r.get("target_hard")
            members = r.get("img_set", {}).get("members")
            for n in (r["reference"], tgt, *(members or ())):
                if n is not None and n not in rel:
                    raise ValueError(f"CIRR: image {n!r} (pair {r.get('pairid')}) of {ann / cap} is not in {ann / spl}")
            triplets.append(dict(pairid=r.get("pairid"), reference=r["reference"], target=tgt, text=r["caption"],
                                 captions=[r["caption"]], members=list(members) if members else None, category=None,
                                 subset=r.get("img_set", {}).get("id")))
            noisy.append(bool(r.get("noisy", False)))
        self._setup("CIRR", root, split, (names, paths, triplets, noisy), Options(
            view, transform, skip_missing, noise, return_images, random_text, extra_triplets))


def _cirr_layout(root, ann, img_root):
    if ann == root and img_root == root / "img_raw":
        return "CIRR release layout (img_raw/)"
    if ann == root / "cirr" and img_root == root:
        return "CLIP4Cir layout (cirr/ subfolder)"
    if ann == root and img_root == root:
        return "flat layout (images beside captions/, as the toy)"
    return "custom layout"


class FashionIQ(_CIRDataset):
    """FashionIQ, one or several categories in one dataset (per-category evaluation: one dataset per category).

    root: --data-root; annotations in <root> or <root>/fashionIQ_dataset; images in <annotations>/images or
    <root>/images (flat, or one subfolder per category), .png or .jpg.
    .images: the union of the categories' split images (split-file order, categories in the given order; shirt and
    toptee share some images, kept once); .category_images: {category: its own list}, the per-category gallery.
    triplets: dicts {reference (candidate), target (None on test), text ("c0 and c1"), captions (the raw 2),
    members None, pairid None, category, row (its index in cap.<category>.<split>.json)}.
    """

    def __init__(self, root, categories=FIQ_CATEGORIES, split="train", view="triplets", transform=None,
                 skip_missing=False, noise=None, return_images=True, random_text=None,
                 extra_triplets=None):
        root = Path(root).expanduser()
        categories = (categories,) if isinstance(categories, str) else tuple(categories)
        if split not in FIQ_SPLITS:
            raise ValueError(f"FashionIQ: split must be one of {FIQ_SPLITS}, got {split!r}")
        bad = [c for c in categories if c not in FIQ_CATEGORIES]
        if bad or not categories:
            raise ValueError(f"FashionIQ: categories must be among {FIQ_CATEGORIES}, got {categories}")
        need = [f for c in categories
                for f in (f"captions/cap.{c}.{split}.json", f"image_splits/split.{c}.{split}.json")]
        ann = _first_dir(_unique([root, root / "fashionIQ_dataset", root / "fashioniq"]), need)
        if ann is None:
            raise FileNotFoundError(
                f"FashionIQ: no annotations for split {split!r} under {root}: expected " + ", ".join(need)
                + f" in {root} (or {root / 'fashionIQ_dataset'}). Point --data-root at the dataset folder.")
        img_dirs = _unique([ann / "images", root / "images"])
        img_dir = next((d for d in img_dirs if d.is_dir()), None)
        if img_dir is None:
            raise FileNotFoundError(f"FashionIQ: annotations found in {ann}, but no image folder: expected "
                                    + " or ".join(str(d) for d in img_dirs) + " holding <name>.png or <name>.jpg")
        found = _scan_images(img_dir)  # {stem: Path}

        images, self.category_images, triplets = [], {}, []
        seen = set()
        for c in categories:
            split_names = _read_json(ann / f"image_splits/split.{c}.{split}.json")
            in_split = set(split_names)
            extra = []  # names used by the captions but absent from the category's split file (none in the release)
            for j, r in enumerate(_read_json(ann / f"captions/cap.{c}.{split}.json")):
                for n in (r["candidate"], r.get("target")):
                    if n is not None and n not in in_split:
                        in_split.add(n)
                        extra.append(n)
                triplets.append(dict(pairid=None, reference=r["candidate"], target=r.get("target"),
                                     text=fiq_text(r["captions"]), captions=list(r["captions"]), members=None,
                                     category=c, row=j))
            if extra:
                say(f"FashionIQ {c} {split}: {len(extra)} caption images are not in split.{c}.{split}.json; "
                    f"appended to the gallery, e.g. {extra[:3]}")
            self.category_images[c] = split_names + extra
            for n in split_names + extra:
                if n not in seen:
                    seen.add(n)
                    images.append(n)
        # A name without a file gets the path it would have (the copy's usual extension) for the missing report.
        suffixes = [p.suffix for p in found.values()]
        usual = max(IMAGE_EXTS, key=suffixes.count) if suffixes else ".png"
        paths = {n: found.get(n, img_dir / f"{n}{usual}") for n in images}
        exts = sorted({p.suffix for n, p in paths.items() if n in found})
        if not any(n in found for n in images):
            raise FileNotFoundError(f"FashionIQ: annotations found in {ann}, but none of the {split} images is in "
                                    f"{img_dir}: expected e.g. {img_dir / (images[0] + '.png')} (or .jpg)")
        say(f"FashionIQ {split} {'+'.join(categories)}: annotations {ann}, images {img_dir} "
            f"({'/'.join(exts)})")
        self._setup("FashionIQ", root, split, (images, paths, triplets, [False] * len(triplets)), Options(
            view, transform, skip_missing, noise, return_images, random_text, extra_triplets))
        if len(self.images) != len(images):  # skip_missing dropped some: keep the per-category lists consistent
            self.category_images = {c: [n for n in ns if n in self.index] for c, ns in self.category_images.items()}

    def _text(self, t):
        return fiq_random_text(t["captions"]) if self.random_text else t["text"]


def _scan_images(folder):
    """{stem: Path} of the image files in `folder` and in its immediate subfolders (per-category copies)."""
    found, subdirs = _scan_one(folder)
    for d in sorted(subdirs):
        for stem, p in _scan_one(d)[0].items():
            found.setdefault(stem, p)
    return found


def _scan_one(folder):
    """One scandir: ({stem: Path} of image files, preferring IMAGE_EXTS order), [subfolders]."""
    rank = {e: i for i, e in enumerate(IMAGE_EXTS)}
    out, subdirs = {}, []
    with os.scandir(folder) as it:
        for e in it:
            stem, ext = os.path.splitext(e.name)
            ext = ext.lower()
            if ext in rank:
                if stem not in out or rank[ext] < rank[out[stem].suffix.lower()]:
                    out[stem] = Path(e.path)
            elif e.is_dir():
                subdirs.append(e.path)
    return out, subdirs



# -----------------------------------------------------------------------------
# Shoes

SHOES_SPLITS = ("train", "test")
SHOES_CAPTIONS = "relative_captions_shoes.json"
SHOES_SPLIT_FILES = {"train": "train_im_names.txt", "test": "eval_im_names.txt"}
SHOES_DEPTH = 4  # folders searched below the root: <top>/womens_<cat>/<0|1>/ is 3, one for slack


class Shoes(_CIRDataset):
    """Shoes (Guo et al., NeurIPS 2018: relative captions on the Attribute Discovery images of Berg
    et al., 2010), NCL-CIR's second benchmark, on its official release.

    root: --data-root. Annotations (relative_captions_shoes.json, train_im_names.txt,
    eval_im_names.txt) in <root> or <root>/dataset. Images are found by file name up to SHOES_DEPTH
    folders below <root>: the archive's womens_<category>/<0|1>/<name>.jpg, possibly under a top
    folder such as attributedata/, or a flat folder.
    Splits: "train" (train_im_names.txt) and "test" (eval_im_names.txt). Shoes has no val split:
    its papers, and this project's validation during training, evaluate on test.
    A triplet belongs to the split that holds both of its images (8,990 train, 1,761 test in the
    release). A row repeated exactly is kept once. A row whose reference is its target is kept and
    counted (.n_self_pairs): the protocol removes the reference from the ranking, so such a query is
    always a miss (evaluate.shoes_metrics).
    .images: the split file's names in its order (the test gallery: all 4,658 eval images).
    triplets: dicts {reference, target, text (the caption, stripped), captions [text], members None,
    pairid (the row's index in the JSON file), category None}.
    """

    def __init__(self, root, split="train", view="triplets", transform=None, skip_missing=False,
                 noise=None, return_images=True, random_text=None, extra_triplets=None):
        # random_text: no effect (one caption per query); extra_triplets: see _read_extra
        root = Path(root).expanduser()
        if split not in SHOES_SPLITS:
            raise ValueError(f"Shoes: split must be one of {SHOES_SPLITS}, got {split!r} (Shoes has "
                             f"no val split: evaluation uses test, the images of eval_im_names.txt)")
        ann = _first_dir(_unique([root, root / "dataset"]), [SHOES_CAPTIONS])
        if ann is None:
            raise FileNotFoundError(
                f"Shoes: no {SHOES_CAPTIONS} in {root} or {root / 'dataset'}: point --data-root at "
                f"the Shoes folder that holds it (with train_im_names.txt, eval_im_names.txt and the "
                f"womens_*/ image folders)")
        split_file = ann / SHOES_SPLIT_FILES[split]
        if not split_file.is_file():
            raise FileNotFoundError(f"Shoes: {split_file} not found: put the release's "
                                    f"{split_file.name} (the {split} images) beside {SHOES_CAPTIONS}")
        lines = (s.strip() for s in split_file.read_text().splitlines())
        names = list(dict.fromkeys(n for n in lines if n))
        if not names:
            raise ValueError(f"Shoes: {split_file} names no image; put the release's file there")
        in_split = set(names)

        # Triplets: both images in this split; an exact repeat kept once, in the file's order.
        triplets, seen, repeated, across = [], set(), 0, 0
        for i, row in enumerate(_read_shoes_rows(ann / SHOES_CAPTIONS)):
            if row in seen:
                repeated += 1
                continue
            seen.add(row)
            ref, tgt, text = row
            if ref in in_split and tgt in in_split:
                triplets.append(dict(pairid=i, reference=ref, target=tgt, text=text, captions=[text],
                                     members=None, category=None))
            elif ref in in_split or tgt in in_split:
                across += 1                                          # none in the release

        # Images by file name. A name not found gets a path that does not exist, so that
        # skip_missing drops it in _setup like any missing image.
        found = _find_by_name(root, in_split)
        if not found:
            eg = root / names[0].removeprefix("img_").rsplit("_", 1)[0] / "0" / names[0]
            raise FileNotFoundError(
                f"Shoes: annotations found in {ann}, but none of the {len(names)} images of "
                f"{split_file.name} is within {SHOES_DEPTH} folders below {root}: expected e.g. {eg} "
                f"(the Attribute Discovery archive unpacked); point --data-root at the folder "
                f"holding womens_*/")
        missing = [n for n in names if n not in found]
        if missing and not skip_missing:
            raise FileNotFoundError(
                f"Shoes {split}: {len(missing)} of {len(names)} images named in {split_file} are not "
                f"below {root}, e.g. {', '.join(missing[:3])}: unpack the Attribute Discovery archive "
                f"there (womens_<category>/<0|1>/<name>.jpg), or pass skip_missing=True "
                f"(--skip-missing) to drop the triplets that use them")
        paths = {n: found.get(n, root / n) for n in names}
        n_self = sum(t["reference"] == t["target"] for t in triplets)
        say(f"Shoes {split}: {_shoes_layout(root, found.values())}: {len(triplets)} triplets "
            f"({n_self} with reference = target) over {len(names)} images; annotations {ann}"
            + (f"; {repeated} repeated rows of {SHOES_CAPTIONS} kept once" if repeated else "")
            + (f"; {across} rows with one image outside the split left out" if across else ""))
        self._setup("Shoes", root, split, (names, paths, triplets, [False] * len(triplets)), Options(
            view, transform, skip_missing, noise, return_images, random_text, extra_triplets))
        self.n_self_pairs = sum(t["reference"] == t["target"] for t in self.triplets)


def _read_shoes_rows(path):
    """(reference, target, caption) of every row of relative_captions_shoes.json, in file order,
    captions stripped."""
    rows = _read_json(path)
    keys = ("ReferenceImageName", "ImageName", "RelativeCaption")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(k in r for k in keys)
                                             for r in rows):
        raise ValueError(f"{path}: expected a JSON list of {{ImageName, ReferenceImageName, "
                         f"RelativeCaption}} rows (the release's format); re-download it")
    return [(r["ReferenceImageName"], r["ImageName"], str(r["RelativeCaption"]).strip())
            for r in rows]


def _find_by_name(root, wanted, depth=SHOES_DEPTH):
    """{name: Path} of the files named in `wanted`, at most `depth` folders below root. Breadth first
    (the shallowest copy wins; folders in name order), one scandir per folder and no stat per file;
    it stops once every name is found. Hidden folders and __MACOSX/ (zip debris) are not entered."""
    found, level = {}, [root]
    for _ in range(depth + 1):
        below = []
        for folder in level:
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue
            for e in entries:
                if e.name in wanted:
                    found.setdefault(e.name, Path(e.path))
                elif not e.name.startswith((".", "__MACOSX")) and e.is_dir():
                    below.append(e.path)
        if len(found) == len(wanted) or not below:
            break
        level = below
    return found


def _shoes_layout(root, paths):
    """The folder layout that most of the found images are in, named for the log line."""
    def kind(folders):
        if len(folders) == 2 and folders[0].startswith("womens_"):
            return "Attribute Discovery layout (womens_<category>/<0|1>/)"
        if len(folders) == 3 and folders[1].startswith("womens_"):
            return f"Attribute Discovery layout under {folders[0]}/ (womens_<category>/<0|1>/)"
        if len(folders) <= 1:
            return f"flat layout (images in {folders[0] + '/' if folders else 'the root'})"
        return "custom layout"
    counts = {}
    for p in paths:
        k = kind(p.relative_to(root).parts[:-1])
        counts[k] = counts.get(k, 0) + 1
    return max(counts, key=counts.get)


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
# the dataset a run's settings name

def dataset(s, split, view, transform=None, return_images=True):
    """The dataset a run's settings s name (s.dataset, data_root, categories, skip_missing; for the training
    triplets also noise, noise_kind, seed, extra_triplets): CIRR (and the toy, written in CIRR's layout),
    FashionIQ or Shoes, in one of its two views."""
    kw = dict(view=view, transform=transform, skip_missing=s.skip_missing)
    if split == "train" and view == "triplets":
        kw.update(noise=Noise(s.noise, s.noise_kind, s.seed), return_images=return_images,
                  extra_triplets=s.extra_triplets)
    elif view == "triplets":
        kw.update(return_images=return_images)
    if s.dataset == "fashioniq":
        return FashionIQ(s.data_root, s.categories, split, **kw)
    if s.dataset == "shoes":
        return Shoes(s.data_root, split, **kw)
    return CIRR(s.data_root, split, **kw)
