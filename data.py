"""CIRR, FashionIQ and Shoes read from their official on-disk layouts (docs/data.md); each split is a
triplets.TripletDataset. The toy benchmark (toy.py) is written in CIRR's layout, so the CIRR class reads it unchanged.

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
"""
import json
import os
import sys
from pathlib import Path

import torch

import runtime
import toy
import triplets
from runtime import FIQ_CATEGORIES
from triplets import TripletDataset, _read_json
import util
from util import log

IMAGE_EXTS = (".png", ".jpg", ".jpeg")  # FashionIQ copies use .png or .jpg; the first found wins in this order
CIRR_SPLITS = ("train", "val", "test1")
FIQ_SPLITS = ("train", "val", "test")


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


class CIRR(TripletDataset):
    """CIRR rc2 (and the toy benchmark, written in the same layout).

    root: the folder given by --data-root. Annotations are looked for in <root> and <root>/cirr; images under
    <annotations>/img_raw, <annotations>, <root>/img_raw, <root> (the first that holds the split's images).
    triplets: dicts {pairid, reference, target (None on test1), text, captions [text], members (img_set.members,
    includes the reference), category None, subset (img_set.id)}. A caption row's "noisy" key (the toy's ground
    truth) fills .noisy.
    """

    def __init__(self, root, split="train", skip_missing=False, noise=None, extra_triplets=None, name="CIRR"):
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
        layout = "" if name == "toy" else f"{_cirr_layout(root, ann, img_root)}: "
        log(f"{name} {split}: {layout}annotations {ann}, images {img_root}", once=True)

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
        self._setup(name, root, split, (names, paths, triplets, noisy), skip_missing, noise, extra_triplets)


def _cirr_layout(root, ann, img_root):
    if ann == root and img_root == root / "img_raw":
        return "CIRR release layout (img_raw/)"
    if ann == root / "cirr" and img_root == root:
        return "CLIP4Cir layout (cirr/ subfolder)"
    if ann == root and img_root == root:
        return "flat layout (images beside captions/, as the toy)"
    return "custom layout"


class FashionIQ(TripletDataset):
    """FashionIQ, one or several categories in one dataset (per-category evaluation: one dataset per category).

    root: --data-root; annotations in <root> or <root>/fashionIQ_dataset; images in <annotations>/images or
    <root>/images (flat, or one subfolder per category), .png or .jpg.
    .images: the union of the categories' split images (split-file order, categories in the given order; shirt and
    toptee share some images, kept once); .category_images: {category: its own list}, the per-category gallery.
    triplets: dicts {reference (candidate), target (None on test), text ("c0 and c1"), captions (the raw 2),
    members None, pairid None, category, row (its index in cap.<category>.<split>.json)}.
    """

    def __init__(self, root, categories=FIQ_CATEGORIES, split="train", skip_missing=False, noise=None,
                 random_text=None, extra_triplets=None):
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
                log(f"FashionIQ {c} {split}: {len(extra)} caption images are not in split.{c}.{split}.json; "
                    f"appended to the gallery, e.g. {extra[:3]}", once=True)
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
        log(f"FashionIQ {split} {'+'.join(categories)}: annotations {ann}, images {img_dir} "
            f"({'/'.join(exts)})", once=True)
        self.random_text = split == "train" if random_text is None else random_text   # training: random order
        self._setup("FashionIQ", root, split, (images, paths, triplets, [False] * len(triplets)), skip_missing,
                    noise, extra_triplets)
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


class Shoes(TripletDataset):
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

    def __init__(self, root, split="train", skip_missing=False, noise=None, extra_triplets=None):
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
        log(f"Shoes {split}: {_shoes_layout(root, found.values())}: {len(triplets)} triplets "
            f"({n_self} with reference = target) over {len(names)} images; annotations {ann}"
            + (f"; {repeated} repeated rows of {SHOES_CAPTIONS} kept once" if repeated else "")
            + (f"; {across} rows with one image outside the split left out" if across else ""), once=True)
        self._setup("Shoes", root, split, (names, paths, triplets, [False] * len(triplets)), skip_missing, noise,
                    extra_triplets)
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


# -----------------------------------------------------------------------------
# the dataset a run's settings name

def dataset(s, split):
    """The split of the dataset the settings s name (s.dataset, data_root, categories, skip_missing; for the training
    split also noise, noise_kind, seed, extra_triplets, train_file): CIRR (and the toy, written in CIRR's layout),
    FashionIQ, Shoes, or your own triplets (triplets.Triplets)."""
    kw = dict(skip_missing=s.skip_missing)
    if split == "train":
        kw.update(noise=triplets.Noise(s.noise, s.noise_kind, s.seed), extra_triplets=s.extra_triplets)
    if s.dataset == "fashioniq":
        return FashionIQ(s.data_root, s.categories, split, **kw)
    if s.dataset == "shoes":
        return Shoes(s.data_root, split, **kw)
    if s.dataset == "triplets":
        return triplets.Triplets(s.data_root, split, file=s.train_file if split == "train" else None, **kw)
    return CIRR(s.data_root, split, name="toy" if s.dataset == "toy" else "CIRR", **kw)


# -----------------------------------------------------------------------------
# converters: CIRR, FashionIQ, Shoes and the toy in the triplet format (python data.py convert ...)

CONVERT_SPLITS = {"cirr": ("train", "val", "test1"), "toy": ("train", "val", "test1"), "fashioniq": FIQ_SPLITS,
                  "shoes": ("train", "test")}
FORMAT_SPLIT = {"test1": "test", "test": "test"}     # the triplet format's name of a split; Shoes' test is its val


def convert(s, out, splits=None):
    """Write the dataset the settings s name (dataset, data_root, categories, skip_missing, noise, noise_kind,
    seed) in the triplet format into `out`: train.jsonl, val.jsonl, test.jsonl (where the dataset has the split;
    Shoes validates on its test split, written as val.jsonl). Image paths relative to `out`; CIRR's and the toy's
    img_set as subset; FashionIQ's category and caption pair, CIRR's pairid kept; the training split's noise, the
    toy's own and any injected, as the noisy key (the replaced field). splits: the dataset's own names (default:
    all of CONVERT_SPLITS). Returns {split in the format: number of rows}."""
    out = Path(out)
    written = {}
    for split in splits or CONVERT_SPLITS[s.dataset]:
        ds = dataset(s, split)
        name = "val" if split == runtime.EVAL_SPLIT[s.dataset] else FORMAT_SPLIT.get(split, split)
        rel = lambda n: os.path.relpath(ds.paths[n], out)
        keep = lambda t: dict(category=t["category"], captions=t["captions"]) if t.get("category") else {}
        rows = [triplets.as_row({**t, "row": keep(t)}, f, rel) for t, f in zip(ds.triplets, ds.noise_field.tolist())]
        util.atomic_write(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        written[name] = len(rows)
    return written


def main(argv=None):
    p = util.ArgumentParser("""Data tools.

    python data.py convert --dataset cirr --data-root DIR --out OUT     # CIRR, FashionIQ, Shoes, the toy in the
                                                                       # triplet format (train.jsonl, val.jsonl)
    python data.py convert --dataset toy --noise 0.3 --out OUT          # the toy, 30% of its training triplets
                                                                       # corrupted, the truth as 'noisy'""")
    p.add_argument("command", choices=["convert"])
    p.add_argument("--dataset", required=True, choices=list(CONVERT_SPLITS))
    p.add_argument("--data-root", default=None, help="the dataset's folder (toy: the default toy set if omitted)")
    p.add_argument("--out", required=True, help="the folder for train.jsonl, val.jsonl, test.jsonl")
    p.add_argument("--categories", nargs="+", default=list(FIQ_CATEGORIES))
    p.add_argument("--skip-missing", action="store_true", help="leave out triplets whose images are missing")
    p.add_argument("--noise", type=float, default=0.0, help="corrupt this share of the training triplets")
    p.add_argument("--noise-kind", default="shuffle", choices=triplets.NOISE_KINDS)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.dataset == "toy":                           # generated on first use
        a.data_root = str(toy.toy_root(a.data_root))
    if not a.data_root or not Path(a.data_root).expanduser().is_dir():
        p.error(f"--data-root {a.data_root}: no such folder; point it at the {a.dataset} dataset folder")
    triplets.check_noise(triplets.Noise(a.noise, a.noise_kind, a.seed), has_subsets=a.dataset in runtime.SUBSETS)
    a.extra_triplets = a.train_file = None
    written = convert(a, a.out)
    print(f"wrote {', '.join(f'{k}.jsonl ({v:,} rows)' for k, v in written.items())} in {a.out}; train on it: "
          f"python train.py --dataset triplets --data-root {a.out}" + (" --preset toy" if a.dataset == "toy" else "")
          + (f" (its {a.noise:.0%} injected noise is in train.jsonl's 'noisy' key)" if a.noise else ""))
    return written


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:   # bad input: one line, no traceback
        sys.exit(f"error: {util.error_line(e)}")
