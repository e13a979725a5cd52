"""The datasets, one reader each (DATASETS), in their official layouts (docs/data.md); a split is a
triplets.TripletDataset. The toy benchmark (toy.py) is written in CIRR's layout.
- CIRR rc2: captions/cap.rc2.<split>.json and image_splits/split.rc2.<split>.json ({name:
  "./dev/dev-244-0-img0.png"}, relative to the image root); images in img_raw/ (the release),
  annotations in cirr/ and images beside it (CLIP4Cir's copy), or all flat (the toy).
- FashionIQ: captions/cap.<cat>.<split>.json ([{candidate, target, captions[2]}]; test: no target),
  image_splits/split.<cat>.<split>.json (names), images/<name>.png|jpg.
- Shoes: relative_captions_shoes.json ([{ImageName (target), ReferenceImageName, RelativeCaption}]),
  {train,eval}_im_names.txt (splits train, test), in the root or dataset/; images found by name:
  womens_<category>/<0|1>/<name>.jpg (the Attribute Discovery archive), maybe under a top folder
  (attributedata/), or flat."""
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import toy
import triplets
import util
from triplets import NOISE_FIELDS, TripletDataset, _read_json, as_row, make_triplet

CIRR_SPLITS = ("train", "val", "test1")
FIQ_SPLITS = ("train", "val", "test")
FIQ_CATEGORIES = ("dress", "shirt", "toptee")
SHOES_SPLITS = ("train", "test")
SHOES_CAPTIONS = "relative_captions_shoes.json"
SHOES_SPLIT_FILES = {"train": "train_im_names.txt", "test": "eval_im_names.txt"}
SHOES_KEYS = ("ReferenceImageName", "ImageName", "RelativeCaption")  # reference, target, text
SHOES_DEPTH = 4  # folders searched below the root: <top>/womens_<cat>/<0|1>/ is 3, one for slack
IMAGE_EXTS = {".png": 0, ".jpg": 1, ".jpeg": 2}  # FashionIQ's copies: .png or .jpg; the first wins

@dataclass(frozen=True)
class Spec:
    """A dataset: its reader, its own splits, the split validation and evaluate.py use, its
    metrics, and what the code asks of it instead of its name."""
    read: Callable          # (settings, split) -> TripletDataset
    splits: tuple
    eval_split: str
    protocol: str           # the metrics: "cirr", "fashioniq", "shoes" or "triplets"
    subsets: bool           # queries carry subsets: Recall_subset, partial noise, group batches
    make_root: Callable = None  # a generated dataset (the toy): --data-root -> its folder
    noise: float = 0.0      # --noise when none is given: the toy is a noisy benchmark
    known_noise: bool = False   # the files mark noisy triplets: --oracle without --noise
    per_category: bool = False  # FashionIQ: a gallery, and a pool of SPN's pairs, per category
    own_rows: bool = False  # your own files: --train-file, the audit's clean copy
    ident: Callable = None  # triplet -> the dataset's own identifier of it (the audit's rows)
    group: Callable = None  # triplets -> (name, a label per triplet): the audit's breakdown
    answers: Callable = None    # (test split, root) -> the split with its held-out targets

def _given(s, split):
    """What every reader takes from the settings: skip_missing; for training, noise and extras."""
    train = split == "train"
    return dict(skip_missing=s.skip_missing, extra_triplets=s.extra_triplets if train else None,
                noise=triplets.Noise(s.noise, s.noise_kind, s.seed) if train else None)

def _edit_types(trips):
    def edit(text):
        try:
            return toy.edit_type(text)
        except ValueError:                      # a generated positive's template text
            return "other"
    return "edit type", [edit(t["text"]) for t in trips]

def _categories(trips):
    cats = [t["category"] for t in trips]
    return ("category", cats) if all(cats) else None

_PAIR = lambda t: dict(pairid=t["pairid"], subset=t["subset"])     # CIRR's pairid and img_set id
DATASETS = dict(
    toy=Spec(lambda s, split: CIRR(s.data_root, split, name="toy", **_given(s, split)),
             CIRR_SPLITS, "val", "cirr", True, make_root=toy.toy_root, noise=0.3, known_noise=True,
             ident=_PAIR, group=_edit_types, answers=toy.with_answers),
    cirr=Spec(lambda s, split: CIRR(s.data_root, split, **_given(s, split)), CIRR_SPLITS, "val",
              "cirr", True, ident=_PAIR, group=lambda ts: ("subset", [t["subset"] for t in ts])),
    fashioniq=Spec(lambda s, split: FashionIQ(s.data_root, s.categories, split, **_given(s, split)),
                   FIQ_SPLITS, "val", "fashioniq", False, per_category=True, group=_categories,
                   ident=lambda t: dict(category=t["category"], row=t["line"])),
    shoes=Spec(lambda s, split: Shoes(s.data_root, split, **_given(s, split)), SHOES_SPLITS,
               "test", "shoes", False, ident=lambda t: dict(row=t["pairid"])),  # no val split
    triplets=Spec(lambda s, split: triplets.Triplets(
        s.data_root, split, file=s.train_file if split == "train" else None, **_given(s, split)),
        triplets.FORMAT_SPLITS, "val", "triplets", True, known_noise=True, own_rows=True,
        ident=_PAIR, group=_categories))

def dataset(s, split):
    """The split of the dataset the settings s name (dataset, data_root, categories, skip_missing;
    for the training split also noise, noise_kind, seed, extra_triplets, train_file)."""
    return DATASETS[s.dataset].read(s, split)

def data_root(root, dataset):
    """The dataset's folder for evaluate, audit and spn: given, the run's, or a generated
    dataset's own (not generated here); one line when missing."""
    made = DATASETS[dataset].make_root
    root = root or (str(toy.default_toy_root()) if made else None)
    if not root:
        raise SystemExit(f"error: --dataset {dataset} needs --data-root DIR")
    if not made and not Path(root).expanduser().is_dir():
        raise SystemExit(f"error: --data-root {root}: no such folder; point it at the {dataset} "
                         "dataset folder")
    return root

# -----------------------------------------------------------------------------
# the readers

class CIRR(TripletDataset):
    """CIRR rc2, and the toy. Annotations in <root> or <root>/cirr; images under <ann>/img_raw,
    <ann>, <root>/img_raw or <root>, whichever holds the split's. The toy's "noisy" key: .noisy."""

    def __init__(self, root, split="train", name="CIRR", **opts):
        root = Path(root).expanduser()
        if split not in CIRR_SPLITS:
            raise ValueError(f"CIRR: split must be one of {CIRR_SPLITS}, got {split!r}")
        cap, spl = f"captions/cap.rc2.{split}.json", f"image_splits/split.rc2.{split}.json"
        ann = _first_dir([root, root / "cirr"], [cap, spl], f"CIRR: no annotations for split "
                         f"{split!r} under {root}: expected {cap} and {spl} in {root} (CIRR "
                         f"release, toy) or in {root / 'cirr'} (CLIP4Cir's copy). Point "
                         f"--data-root at the dataset folder.")
        rel = _read_json(ann / spl)  # {name: "./dev/dev-244-0-img0.png"}
        if not isinstance(rel, dict):
            raise ValueError(f"{ann / spl}: expected a JSON object {{name: relative path}}")
        cands = list(dict.fromkeys([ann / "img_raw", ann, root / "img_raw", root]))
        sample = list(rel.values())[:50]                         # a few stats, no listing
        hits = [sum((c / r).is_file() for r in sample) for c in cands]
        if not max(hits):
            raise FileNotFoundError(f"CIRR: annotations found in {ann}, but no {split} images: "
                                    f"expected e.g. {sample[0] if sample else '?'} under one of "
                                    f"{', '.join(map(str, cands))}. Point --data-root at the "
                                    f"folder holding img_raw/ or dev/.")
        img_root = cands[hits.index(max(hits))]
        layout = {(root, root / "img_raw"): "CIRR release layout (img_raw/)",
                  (root / "cirr", root): "CLIP4Cir layout (cirr/ subfolder)",
                  (root, root): "flat layout (images beside captions/, as the toy)"}
        layout = "" if name == "toy" else f"{layout.get((ann, img_root), 'custom layout')}: "
        util.log(f"{name} {split}: {layout}annotations {ann}, images {img_root}", once=True)
        trips, noisy = [], []
        for i, r in enumerate(_read_json(ann / cap)):
            tgt, img_set = r.get("target_hard"), r.get("img_set", {})
            members = img_set.get("members")
            for n in (r["reference"], tgt, *(members or ())):
                if n is not None and n not in rel:
                    raise ValueError(f"CIRR: image {n!r} (pair {r.get('pairid')}) of {ann / cap} "
                                     f"is not in {ann / spl}")
            trips.append(make_triplet(r["reference"], tgt, r["caption"], pairid=r.get("pairid"),
                                      members=members or None, subset=img_set.get("id"), line=i))
            noisy.append(NOISE_FIELDS.index("target") if r.get("noisy") else 0)  # the toy's truth
        paths = {n: img_root / os.path.normpath(r) for n, r in rel.items()}
        self._setup(name, root, split, (list(rel), paths, trips, noisy), **opts)

def fiq_text(captions, draw=False):
    """FashionIQ's text: "c0 and c1", each stripped of '.?, ' (empty ones out); for training (draw)
    "c0 and c1", "c1 and c0", "c0" or "c1", uniformly by torch's RNG, so that DataLoader workers
    and torch.manual_seed govern it."""
    cs = [c for c in (c.strip(".?, ") for c in captions) if c]
    if not draw or len(cs) < 2:
        return " and ".join(cs)
    return (f"{cs[0]} and {cs[1]}", f"{cs[1]} and {cs[0]}", cs[0], cs[1])[int(torch.randint(4, ()))]

class FashionIQ(TripletDataset):
    """FashionIQ, one or more categories (evaluation: one each). Annotations in <root> or
    <root>/fashionIQ_dataset; images in <ann>/images or <root>/images (flat, or by category).
    .images: the categories' split images in order, each once; .category_images: a gallery each."""

    def __init__(self, root, categories=FIQ_CATEGORIES, split="train", random_text=None, **opts):
        root = Path(root).expanduser()
        categories = (categories,) if isinstance(categories, str) else tuple(categories)
        if split not in FIQ_SPLITS:
            raise ValueError(f"FashionIQ: split must be one of {FIQ_SPLITS}, got {split!r}")
        if not categories or any(c not in FIQ_CATEGORIES for c in categories):
            raise ValueError(f"FashionIQ: categories must be among {FIQ_CATEGORIES}, got "
                             f"{categories}")
        need = [f for c in categories
                for f in (f"captions/cap.{c}.{split}.json", f"image_splits/split.{c}.{split}.json")]
        ann = _first_dir([root, root / "fashionIQ_dataset", root / "fashioniq"], need,
                         f"FashionIQ: no annotations for split {split!r} under {root}: expected "
                         f"{', '.join(need)} in {root} (or {root / 'fashionIQ_dataset'}). Point "
                         f"--data-root at the dataset folder.")
        img_dirs = list(dict.fromkeys([ann / "images", root / "images"]))
        img_dir = _first_dir(img_dirs, [], f"FashionIQ: annotations found in {ann}, but no image "
                             f"folder: expected {' or '.join(map(str, img_dirs))} holding "
                             f"<name>.png or <name>.jpg")
        self.category_images, trips = {}, []
        for c in categories:
            names = _read_json(ann / f"image_splits/split.{c}.{split}.json")
            rows = _read_json(ann / f"captions/cap.{c}.{split}.json")
            known = set(names)  # caption images not in the split file (none in the release): extra
            extra = list(dict.fromkeys(n for r in rows for n in (r["candidate"], r.get("target"))
                                       if n is not None and n not in known))
            trips += [make_triplet(r["candidate"], r.get("target"), fiq_text(r["captions"]),
                                   captions=list(r["captions"]), category=c, line=i)
                      for i, r in enumerate(rows)]
            if extra:
                util.log(f"FashionIQ {c} {split}: {len(extra)} caption images are not in split."
                         f"{c}.{split}.json; appended to the gallery, e.g. {extra[:3]}", once=True)
            self.category_images[c] = names + extra
        images = list(dict.fromkeys(n for ns in self.category_images.values() for n in ns))
        found = _find_files(img_dir, set(images), 1, stems=True)  # flat, or a folder a category
        if not found:
            raise FileNotFoundError(f"FashionIQ: annotations found in {ann}, but none of the "
                                    f"{split} images is in {img_dir}: expected e.g. "
                                    f"{img_dir / (images[0] + '.png')} (or .jpg)")
        suffixes = [p.suffix for p in found.values()]  # a missing image: the copy's usual suffix
        usual = max(IMAGE_EXTS, key=suffixes.count)
        paths = {n: found.get(n) or img_dir / f"{n}{usual}" for n in images}
        util.log(f"FashionIQ {split} {'+'.join(categories)}: annotations {ann}, images {img_dir} "
                 f"({'/'.join(sorted(set(suffixes)))})", once=True)
        self.random_text = split == "train" if random_text is None else random_text
        self._setup("FashionIQ", root, split, (images, paths, trips, [0] * len(trips)), **opts)
        if len(self.images) != len(images):  # skip_missing dropped some: per category as well
            self.category_images = {c: [n for n in ns if n in self.index]
                                    for c, ns in self.category_images.items()}

    def _text(self, t):
        return fiq_text(t["captions"], draw=True) if self.random_text else t["text"]

class Shoes(TripletDataset):
    """Shoes (Guo et al., NeurIPS 2018; images of Berg et al., 2010), NCL-CIR's second benchmark; no
    val split (its papers, and validation here, use test). A triplet is in the split holding both
    its images (8,990 train, 1,761 test); a repeated row is kept once, a self-pair kept and counted
    (.n_self_pairs: ranked without its reference, it always misses). .images: the split file's
    names (the test gallery: all 4,658 eval images)."""

    def __init__(self, root, split="train", **opts):
        root = Path(root).expanduser()
        if split not in SHOES_SPLITS:
            raise ValueError(f"Shoes: split must be one of {SHOES_SPLITS}, got {split!r} (no val "
                             f"split: evaluation uses test, the images of eval_im_names.txt)")
        ann = _first_dir([root, root / "dataset"], [SHOES_CAPTIONS], f"Shoes: no {SHOES_CAPTIONS} "
                         f"in {root} or {root / 'dataset'}: point --data-root at the Shoes folder "
                         f"holding it, train_im_names.txt, eval_im_names.txt and womens_*/")
        split_file = ann / SHOES_SPLIT_FILES[split]
        if not split_file.is_file():
            raise FileNotFoundError(f"Shoes: {split_file} not found: put the release's {split} "
                                    f"images file there, beside {SHOES_CAPTIONS}")
        lines = map(str.strip, split_file.read_text().splitlines())
        names = list(dict.fromkeys(n for n in lines if n))
        if not names:
            raise ValueError(f"Shoes: {split_file} names no image; put the release's file there")
        rows, first, in_split = _read_json(ann / SHOES_CAPTIONS), {}, set(names)
        if not isinstance(rows, list) or not all(isinstance(r, dict) and r.keys() >= set(SHOES_KEYS)
                                                 for r in rows):
            raise ValueError(f"{ann / SHOES_CAPTIONS}: expected a JSON list of {{ImageName, "
                             f"ReferenceImageName, RelativeCaption}} rows (the release's format); "
                             f"re-download it")
        for i, (ref, tgt, text) in enumerate([r[k] for k in SHOES_KEYS] for r in rows):
            first.setdefault((ref, tgt, str(text).strip()), i)  # a row repeated exactly: kept once
        trips = [make_triplet(ref, tgt, text, pairid=i, line=i)
                 for (ref, tgt, text), i in first.items() if ref in in_split and tgt in in_split]
        across = sum((ref in in_split) != (tgt in in_split) for ref, tgt, _ in first)  # none
        found = _find_files(root, in_split, SHOES_DEPTH)
        if not found:
            eg = root / names[0].removeprefix("img_").rsplit("_", 1)[0] / "0" / names[0]
            raise FileNotFoundError(f"Shoes: annotations in {ann}, but none of the {len(names)} "
                                    f"images of {split_file.name} is within {SHOES_DEPTH} folders "
                                    f"below {root}: expected e.g. {eg} (the Attribute Discovery "
                                    f"archive unpacked); point --data-root at the folder holding "
                                    f"womens_*/")
        missing = [n for n in names if n not in found]
        if missing and not opts.get("skip_missing"):
            raise FileNotFoundError(f"Shoes {split}: {len(missing)} of {len(names)} images named "
                                    f"in {split_file} are not below {root}, e.g. "
                                    f"{', '.join(missing[:3])}: unpack the Attribute Discovery "
                                    f"archive there (womens_<category>/<0|1>/<name>.jpg), or pass "
                                    f"skip_missing=True (--skip-missing) to drop their triplets")
        n_self, repeated = sum(t["reference"] == t["target"] for t in trips), len(rows) - len(first)
        util.log(f"Shoes {split}: {_shoes_layout(root, found.values())}: {len(trips)} triplets "
                 f"({n_self} with reference = target) over {len(names)} images; annotations {ann}"
                 + (f"; {repeated} repeated rows of {SHOES_CAPTIONS} kept once" if repeated else "")
                 + (f"; {across} rows with one image outside the split left out" if across else ""),
                 once=True)
        paths = {n: found.get(n, root / n) for n in names}  # not found: dropped by skip_missing
        self._setup("Shoes", root, split, (names, paths, trips, [0] * len(trips)), **opts)
        self.n_self_pairs = sum(t["reference"] == t["target"] for t in self.triplets)

def _shoes_layout(root, paths):
    """The folder layout most of the found images are in, named for the log line."""
    def kind(folders):
        if len(folders) in (2, 3) and folders[-2].startswith("womens_"):
            top = f" under {folders[0]}/" if len(folders) == 3 else ""
            return f"Attribute Discovery layout{top} (womens_<category>/<0|1>/)"
        if len(folders) <= 1:
            return f"flat layout (images in {folders[0] + '/' if folders else 'the root'})"
        return "custom layout"
    return Counter(kind(p.relative_to(root).parts[:-1]) for p in paths).most_common(1)[0][0]

def _first_dir(candidates, needed, error):
    """The first candidate folder holding all `needed` relative files; none: FileNotFoundError."""
    found = next((d for d in candidates if d.is_dir() and all((d / f).is_file() for f in needed)),
                 None)
    if found is None:
        raise FileNotFoundError(error)
    return found

def _find_files(root, wanted, depth, stems=False):
    """{name: Path} of the files named in `wanted` (stems: images named without extension) up to
    `depth` folders below root, breadth first (the shallowest wins, then the first of IMAGE_EXTS):
    a scandir a folder, no stat a file; hidden folders and __MACOSX/ (zip debris) not entered."""
    order = lambda e: (IMAGE_EXTS.get(os.path.splitext(e.name)[1].lower(), 9), e.name)
    found, queue = {}, [(root, 0)]
    for folder, d in queue:
        if len(found) == len(wanted):
            break
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=order)             # images first; folders by name
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for e in entries:
            stem, ext = os.path.splitext(e.name)
            name = (stem if ext.lower() in IMAGE_EXTS else None) if stems else e.name
            if name in wanted:
                found.setdefault(name, Path(e.path))
            elif d < depth and not e.name.startswith((".", "__MACOSX")) and e.is_dir():
                queue.append((e.path, d + 1))
    return found

# -----------------------------------------------------------------------------
# python data.py convert: a dataset in the triplet format

def convert(s, out, splits=None):
    """Write the dataset the settings s name in the triplet format into `out` (as_row: ids,
    subsets, categories, caption pairs, the training split's noise): train.jsonl, val.jsonl (its
    eval split), test.jsonl; image paths relative to `out`. splits: default all. -> {name: n}"""
    spec, out, written = DATASETS[s.dataset], Path(out), {}
    for split in splits or spec.splits:
        ds = spec.read(s, split)
        name = "val" if split == spec.eval_split else split.removesuffix("1")  # CIRR's test1
        rel = {n: os.path.relpath(p, out) for n, p in ds.paths.items()}
        rows = [as_row(t, f, rel.get) for t, f in zip(ds.triplets, ds.noise_field.tolist())]
        util.atomic_write(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        written[name] = len(rows)
    return written

def main(argv=None):
    p = util.ArgumentParser("""Data tools: a dataset in the triplet format (train.jsonl, val.jsonl).

    python data.py convert --dataset cirr --data-root DIR --out OUT  # or fashioniq, shoes, toy
    python data.py convert --dataset toy --noise 0.3 --out OUT       # 30% corrupted, as 'noisy'""")
    p.add_argument("command", choices=["convert"])
    p.add_argument("--dataset", required=True,
                   choices=[k for k, d in DATASETS.items() if not d.own_rows])
    p.add_argument("--data-root", default=None, help="the dataset's folder (toy: the default set)")
    p.add_argument("--out", required=True, help="the folder for train.jsonl, val.jsonl, test.jsonl")
    p.add_argument("--categories", nargs="+", default=list(FIQ_CATEGORIES))
    p.add_argument("--skip-missing", action="store_true", help="leave out triplets missing images")
    p.add_argument("--noise", type=float, default=0.0, help="share of training triplets corrupted")
    p.add_argument("--noise-kind", default="shuffle", choices=triplets.NOISE_KINDS)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    spec = DATASETS[a.dataset]
    if spec.make_root:
        a.data_root = str(spec.make_root(a.data_root))
    if not a.data_root or not Path(a.data_root).expanduser().is_dir():
        p.error(f"--data-root {a.data_root}: no such folder; point it at the {a.dataset} dataset "
                f"folder")
    triplets.check_noise(triplets.Noise(a.noise, a.noise_kind, a.seed), has_subsets=spec.subsets)
    a.extra_triplets = a.train_file = None
    written = convert(a, a.out)
    print(f"wrote {', '.join(f'{k}.jsonl ({v:,} rows)' for k, v in written.items())} in {a.out}; "
          f"train on it: python train.py --dataset triplets --data-root {a.out} --preset "
          f"{a.dataset}" + (f" (its {a.noise:.0%} injected noise is in train.jsonl's 'noisy' key)"
                            if a.noise else ""))
    return written

if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:   # bad input: one line, no traceback
        sys.exit(f"error: {util.error_line(e)}")
