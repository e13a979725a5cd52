"""The test suite: `python -m pytest test_all.py`.

Every test checks real behaviour against an independent truth: OpenAI's CLIP code (`clip-anytorch`), scikit-learn,
hand-computed small cases, the real CIRR / FashionIQ annotation files in ../shared/data. No test downloads anything.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from loss import bank_nce, info_nce, soft_nce
from nfb import NoiseFilter, clean_probability, detection_metrics, fit_gmm, minmax
from wcb import WCB, diversity_penalty

# ====================================================================================================
# data.py
# ====================================================================================================

"""Tests of data.py: the real CIRR / FashionIQ annotation files (with placeholder images), layout variants, missing
and corrupt images, noise injection, and the toy benchmark generator."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import data
import toy

SHARED = Path(__file__).resolve().parent.parent / "shared"
CIRR_ANN = SHARED / "data" / "cirr"
FIQ_ANN = SHARED / "data" / "fashioniq"
CATS = ("dress", "shirt", "toptee")


# -----------------------------------------------------------------------------
# placeholder data sets: the real annotation files, one tiny PNG hard-linked under every name they need

def _tiny_png(tmp, ext=".png"):
    tmp.mkdir(parents=True, exist_ok=True)
    p = tmp / f"_tiny{ext}"
    if not p.exists():
        Image.new("RGB", (4, 4), (200, 10, 10)).save(p)
    return p


def _link(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def make_cirr(tmp, splits=("val",), ann_sub="", img_sub="img_raw", drop=()):
    """A CIRR root under tmp: annotations in tmp/ann_sub, images under tmp/img_sub (paths of the split files)."""
    ann = tmp / ann_sub
    png = _tiny_png(tmp)
    for s in splits:
        files = [f"image_splits/split.rc2.{s}.json"] + ([f"captions/cap.rc2.{s}.json"] if s != "train" else [])
        for f in files:
            (ann / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(CIRR_ANN / f, ann / f)
        if s == "train":
            continue
        for name, rel in json.loads((ann / files[0]).read_text()).items():
            if name not in drop:
                _link(png, tmp / img_sub / rel)
    return tmp


def make_fiq(tmp, split="val", cats=CATS, ext=".png", ann_sub="", drop=()):
    ann = tmp / ann_sub
    png = _tiny_png(tmp, ext)
    names = set()
    for c in cats:
        for f in (f"captions/cap.{c}.{split}.json", f"image_splits/split.{c}.{split}.json"):
            (ann / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(FIQ_ANN / f, ann / f)
        names.update(json.loads((ann / f"image_splits/split.{c}.{split}.json").read_text()))
    (ann / "images").mkdir(exist_ok=True)
    for n in sorted(names - set(drop)):
        _link(png, ann / "images" / f"{n}{ext}")
    return tmp


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory):
    return make_cirr(tmp_path_factory.mktemp("cirr"), splits=("val", "test1"))


@pytest.fixture(scope="module")
def fiq_root(tmp_path_factory):
    return make_fiq(tmp_path_factory.mktemp("fiq"))


# -----------------------------------------------------------------------------
# CIRR

def test_cirr_val_real_counts(cirr_root, capsys):
    trip = data.CIRR(cirr_root, "val", return_images=False)
    gal = data.CIRR(cirr_root, "val", view="gallery")
    assert "CIRR release layout (img_raw/)" in capsys.readouterr().out
    assert len(trip) == 4181 and len(trip.triplets) == 4181
    assert len(gal) == 2297 and trip.images == gal.images and trip.index == gal.index
    assert trip.images == list(json.loads((CIRR_ANN / "image_splits/split.rc2.val.json").read_text()))
    rows = json.loads((CIRR_ANN / "captions/cap.rc2.val.json").read_text())
    for t, r in zip(trip.triplets, rows):
        assert t["reference"] in t["members"] and t["target"] in t["members"] and len(set(t["members"])) == 6
        assert t["text"] == r["caption"] and t["target"] == r["target_hard"] and t["pairid"] == r["pairid"]
        for n in t["members"]:
            assert trip.paths[n].is_file()
    assert not trip.noisy.any() and trip.noisy.shape == (4181,)
    with pytest.raises(ValueError, match="training split"):
        data.CIRR(cirr_root, "val", noise_ratio=0.1)
    ref, text, tgt, i = trip[7]
    t = trip.triplets[7]
    assert (trip.images[ref], text, trip.images[tgt], i) == (t["reference"], t["text"], t["target"], 7)
    i, im = gal[5]
    assert i == 5 and im.shape == (3, 4, 4) and im.dtype == torch.float32
    # val items carry names (the evaluator takes image features from the gallery); eval_collate batches them
    t0 = trip.triplets[0]
    assert data.CIRR(cirr_root, "val")[0] == (t0["reference"], t0["text"], t0["target"], tuple(t0["members"]), 0)
    batch = next(iter(DataLoader(data.CIRR(cirr_root, "val"), batch_size=4, collate_fn=data.eval_collate)))
    assert batch[0] == [t["reference"] for t in trip.triplets[:4]] and batch[3][1] == trip.triplets[1]["members"]


def test_cirr_test1_real_counts(cirr_root):
    trip = data.CIRR(cirr_root, "test1", return_images=False)
    assert len(trip) == 4148 and len(trip.images) == 2315
    assert all(t["target"] is None for t in trip.triplets) and (trip.tgt_idx == -1).all()
    assert all(t["reference"] in t["members"] for t in trip.triplets)
    assert trip[0][2] == -1
    ref, text, tgt, members, i = data.CIRR(cirr_root, "test1")[3]
    assert tgt == "" and ref in members and i == 3


@pytest.mark.parametrize("ann_sub,img_sub,label", [("", "img_raw", "CIRR release layout"),
                                                   ("cirr", "", "CLIP4Cir layout"),
                                                   ("", "", "flat layout"),
                                                   ("cirr", "cirr/img_raw", "custom layout")])
def test_cirr_layout_variants(tmp_path, capsys, ann_sub, img_sub, label):
    root = make_cirr(tmp_path, ("val",), ann_sub, img_sub)
    ds = data.CIRR(root, "val", view="gallery")
    out = capsys.readouterr().out
    assert label in out and len(out.strip().splitlines()) == 1
    assert len(ds) == 2297 and all(p.is_file() for p in ds.paths.values())


def test_cirr_train_split_nested_folders(tmp_path):
    """cap.rc2.train.json is not in the shared copy: a train split in the val format with CIRR's nested train/<k>/."""
    rows = json.loads((CIRR_ANN / "captions/cap.rc2.val.json").read_text())[:300]
    names = sorted({n for r in rows for n in (r["reference"], r["target_hard"], *r["img_set"]["members"])})
    split = {n: f"./train/{k % 7}/{n}.png" for k, n in enumerate(names)}
    (tmp_path / "captions").mkdir()
    (tmp_path / "image_splits").mkdir()
    (tmp_path / "captions/cap.rc2.train.json").write_text(json.dumps(rows))
    (tmp_path / "image_splits/split.rc2.train.json").write_text(json.dumps(split))
    png = _tiny_png(tmp_path)
    for n, rel in split.items():
        _link(png, tmp_path / "img_raw" / rel)
    ds = data.CIRR(tmp_path, "train", transform=lambda im: torch.zeros(3, 8, 8))
    ref, text, tgt, i = ds[11]
    assert ref.shape == tgt.shape == (3, 8, 8) and text == rows[11]["caption"] and i == 11
    batch = next(iter(DataLoader(ds, batch_size=5)))
    assert batch[0].shape == (5, 3, 8, 8) and list(batch[3]) == [0, 1, 2, 3, 4]
    noisy = data.CIRR(tmp_path, "train", noise_ratio=0.3, noise_seed=5, return_images=False)
    assert int(noisy.noisy.sum()) == 90
    for t, t0, f in zip(noisy.triplets, ds.triplets, noisy.noisy):
        assert (t["target"] != t0["target"]) == bool(f)
    assert (noisy.tgt_idx == torch.tensor([noisy.index[t["target"]] for t in noisy.triplets])).all()


# -----------------------------------------------------------------------------
# FashionIQ

def test_fashioniq_val_real_counts(fiq_root, capsys):
    counts = {"dress": (2017, 3817), "shirt": (2038, 6346), "toptee": (1961, 5373)}
    for c, (nt, ni) in counts.items():
        trip = data.FashionIQ(fiq_root, (c,), "val", return_images=False)
        gal = data.FashionIQ(fiq_root, c, "val", view="gallery")
        assert len(trip) == nt and len(gal) == ni and trip.images == gal.images
        # every candidate and target is in the category's own val split (checked on the real files)
        assert trip.images == json.loads((FIQ_ANN / f"image_splits/split.{c}.val.json").read_text())
        assert all(t["reference"] in trip.index and t["target"] in trip.index for t in trip.triplets)
        assert all(t["category"] == c and t["members"] is None for t in trip.triplets)
        assert all(p.is_file() and p.suffix == ".png" for p in gal.paths.values())
    assert "(.png)" in capsys.readouterr().out
    both = data.FashionIQ(fiq_root, CATS, "val", return_images=False)
    assert len(both) == 2017 + 2038 + 1961
    assert len(both.images) == 3817 + 6346 + 5373 - 121  # shirt and toptee share 121 val images, kept once
    assert {c: len(v) for c, v in both.category_images.items()} == {c: v[1] for c, v in counts.items()}


def test_fashioniq_text(fiq_root):
    ds = data.FashionIQ(fiq_root, ("dress",), "val", return_images=False)
    rows = json.loads((FIQ_ANN / "captions/cap.dress.val.json").read_text())
    c0, c1 = (c.strip(".?, ") for c in rows[0]["captions"])
    assert ds.triplets[0]["text"] == f"{c0} and {c1}" and ds[0][1] == ds[0][1] == f"{c0} and {c1}"
    assert ds.triplets[0]["captions"] == rows[0]["captions"]
    assert data.fiq_text(["is red.", " has dots, "]) == "is red and has dots"
    assert data.fiq_text(["", "is grey"]) == "is grey"  # an empty caption (3 in val) is left out
    # training: both orders or either caption alone, governed by the torch RNG
    tr = data.FashionIQ(fiq_root, ("dress",), "val", return_images=False, random_text=True)
    torch.manual_seed(0)
    seen = {tr[0][1] for _ in range(200)}
    assert seen == {f"{c0} and {c1}", f"{c1} and {c0}", c0, c1}
    torch.manual_seed(0)
    a = [tr[0][1] for _ in range(20)]
    torch.manual_seed(0)
    assert a == [tr[0][1] for _ in range(20)]


def test_fashioniq_test_split_and_jpg_subfolder(tmp_path, capsys):
    root = make_fiq(tmp_path, "test", ("dress",), ".jpg", ann_sub="fashionIQ_dataset")
    ds = data.FashionIQ(root, "dress", "test", return_images=False)
    assert "(.jpg)" in capsys.readouterr().out
    assert len(ds) == 2024 and len(ds.images) == 3818 and all(t["target"] is None for t in ds.triplets)
    assert all(p.suffix == ".jpg" and p.is_file() for p in ds.paths.values()) and (ds.tgt_idx == -1).all()
    assert ds[0][2] == -1 and data.FashionIQ(root, "dress", "test")[0][2] == ""


def test_fashioniq_train_items(tmp_path):
    root = make_fiq(tmp_path, "train", ("dress",))
    ds = data.FashionIQ(root, "dress", "train")
    ref, text, tgt, i = ds[3]
    assert ref.shape == tgt.shape == (3, 4, 4) and isinstance(text, str) and i == 3
    n = data.FashionIQ(root, "dress", "train", noise_ratio=0.2, noise_seed=1, return_images=False)
    assert int(n.noisy.sum()) == round(0.2 * 5985)


# -----------------------------------------------------------------------------
# missing, corrupt, wrong root

def test_missing_images_error_and_skip(tmp_path, capsys):
    rows = json.loads((CIRR_ANN / "captions/cap.rc2.val.json").read_text())
    gone = sorted({rows[0]["reference"], rows[10]["target_hard"], rows[20]["img_set"]["members"][0]})
    root = make_cirr(tmp_path, ("val",), drop=gone)
    with pytest.raises(FileNotFoundError) as e:
        data.CIRR(root, "val")
    msg = str(e.value)
    assert "3 of 2297 images are missing" in msg and "skip_missing=True" in msg and "--skip-missing" in msg
    assert gone[0] in msg and str(root / "img_raw" / "dev" / f"{gone[0]}.png") in msg
    capsys.readouterr()
    ds = data.CIRR(root, "val", skip_missing=True, return_images=False)
    out = capsys.readouterr().out
    # evaluation needs whole subsets: a query goes when its reference, target or any member is missing
    expect = [r for r in rows if not {r["reference"], r["target_hard"], *r["img_set"]["members"]} & set(gone)]
    assert len(ds) == len(expect) and [t["pairid"] for t in ds.triplets] == [r["pairid"] for r in expect]
    assert f"{4181 - len(expect)} of 4181 triplets dropped" in out and "3 missing images dropped" in out
    gal = data.CIRR(root, "val", view="gallery", skip_missing=True)
    assert len(gal) == 2294 and not set(gone) & set(gal.images) and gal.images == ds.images


def test_missing_fashioniq_skip(tmp_path, capsys):
    rows = json.loads((FIQ_ANN / "captions/cap.shirt.val.json").read_text())
    gone = sorted({rows[i]["candidate"] for i in range(0, 400, 7)} | {rows[5]["target"]})
    root = make_fiq(tmp_path, "val", ("shirt",), drop=gone)
    with pytest.raises(FileNotFoundError, match=f"{len(gone)} of 6346 images are missing"):
        data.FashionIQ(root, "shirt", "val")
    ds = data.FashionIQ(root, "shirt", "val", skip_missing=True)
    expect = [r for r in rows if r["candidate"] not in gone and r["target"] not in gone]
    assert len(ds) == len(expect) and len(ds.images) == 6346 - len(gone)
    assert f"{2038 - len(expect)} of 2038 triplets dropped" in capsys.readouterr().out


def test_corrupt_image_names_path(tmp_path):
    root = make_cirr(tmp_path, ("val",))
    ds = data.CIRR(root, "val", view="gallery")
    p = ds.paths[ds.images[3]]
    p.unlink()  # a hard link: replace it, do not write through it
    p.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    ds[2]
    with pytest.raises(RuntimeError, match=re.escape(str(p))):
        ds[3]


def test_wrong_root(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.CIRR(tmp_path / "nowhere", "val")
    msg = str(e.value)
    assert "captions/cap.rc2.val.json" in msg and "image_splits/split.rc2.val.json" in msg
    assert str(tmp_path / "nowhere" / "cirr") in msg
    with pytest.raises(FileNotFoundError, match="cap.dress.val.json"):
        data.FashionIQ(tmp_path, "dress", "val")
    # annotations without any image: a wrong root, whatever skip_missing says
    root = make_cirr(tmp_path / "noimg", ("val",), drop=set(json.loads(
        (CIRR_ANN / "image_splits/split.rc2.val.json").read_text())))
    with pytest.raises(FileNotFoundError, match="no val images"):
        data.CIRR(root, "val", skip_missing=True)
    with pytest.raises(ValueError, match="split"):
        data.CIRR(root, "test")


# -----------------------------------------------------------------------------
# noise injection

def _trips(n=200, m=50):
    return [dict(reference=f"i{k % m}", target=f"i{(k * 7 + 1) % m}", text="t") for k in range(n)]


def test_inject_noise():
    trips = _trips()
    images = [f"i{k}" for k in range(50)]
    for p in (0.1, 0.25, 0.5, 0.8, 1.0):
        new, flags = data.inject_noise(trips, images, p, seed=3)
        assert int(flags.sum()) == round(p * 200) and flags.dtype == torch.bool
        for t, t0, f in zip(new, trips, flags):
            assert (t["target"] != t0["target"]) == bool(f) and t["reference"] == t0["reference"]
            if f:
                assert t["target"] in images and t["target"] != t0["reference"]
        new2, flags2 = data.inject_noise(trips, images, p, seed=3)
        assert new2 == new and torch.equal(flags, flags2)
    assert data.inject_noise(trips, images, 0.5, seed=4)[0] != data.inject_noise(trips, images, 0.5, seed=3)[0]
    assert trips == _trips()  # input untouched
    same, flags = data.inject_noise(trips, images, 0.0, seed=1)
    assert all(a is b for a, b in zip(same, trips)) and len(same) == 200 and not flags.any()
    with pytest.raises(ValueError):
        data.inject_noise(trips, images, 1.5, 0)


# -----------------------------------------------------------------------------
# the toy benchmark

COL = "|".join(toy.TOY_COLORS)
SH = "circle|square|triangle"
CELL = "|".join(toy.TOY_CELLS)
REF = re.compile(rf"^(?:(?P<size>small|large) )?(?:(?P<color>{COL}) )?(?P<shape>{SH})(?: at the (?P<cell>{CELL}))?$")
EDITS = [  # an independent parser of the grammar in data.py's docstring
    ("color", re.compile(rf"^(?:make|paint) the (?P<ref>.+) (?P<color>{COL})$")),
    ("size", re.compile(r"^make the (?P<ref>.+) (?P<dir>bigger|smaller)$")),
    ("size", re.compile(r"^(?P<dir>enlarge|shrink) the (?P<ref>.+)$")),
    ("shape", re.compile(rf"^(?:turn the (?P<ref>.+) into|make the (?P<ref2>.+)) a (?P<shape>{SH})$")),
    ("add", re.compile(rf"^(?:add|put) a (?P<size>small|large) (?P<color>{COL}) (?P<shape>{SH}) "
                       rf"at the (?P<cell>{CELL})$")),
    ("remove", re.compile(r"^(?:remove|take away) the (?P<ref>.+)$")),
    ("move", re.compile(rf"^(?:move|shift) the (?P<ref>.+) to the (?P<cell>{CELL})$")),
]


def apply_edit(scene, text):
    """Apply a modification text to a scene (list of {shape, color, size, cell}); asserts the reference is unique."""
    for op, rx in EDITS:
        m = rx.match(text)
        if m:
            break
    else:
        raise AssertionError(f"unparsed: {text!r}")
    g = m.groupdict()
    scene = [dict(o) for o in scene]
    if op == "add":
        assert all(o["cell"] != g["cell"] for o in scene)
        scene.append(dict(shape=g["shape"], color=g["color"], size=g["size"], cell=g["cell"]))
    else:
        r = REF.match(g.get("ref") or g.get("ref2")).groupdict()
        hits = [o for o in scene if all(o[k] == v for k, v in r.items() if v is not None)]
        assert len(hits) == 1, f"ambiguous or dangling reference in {text!r}"
        o = hits[0]
        if op == "color":
            assert o["color"] != g["color"]
            o["color"] = g["color"]
        elif op == "size":
            big = g["dir"] in ("bigger", "enlarge")
            assert o["size"] == ("small" if big else "large")
            o["size"] = "large" if big else "small"
        elif op == "shape":
            assert o["shape"] != g["shape"]
            o["shape"] = g["shape"]
        elif op == "remove":
            scene.remove(o)
        else:
            assert all(x["cell"] != g["cell"] for x in scene)
            o["cell"] = g["cell"]
    return sorted(scene, key=lambda o: toy.TOY_CELLS.index(o["cell"]))


SMALL = dict(n_train=120, n_val=40, n_test=40)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def toy_set(tmp_path_factory):
    return toy.make_toy(tmp_path_factory.mktemp("toy_set") / "t", seed=7, noise=0.25, **SMALL)


def test_toy_deterministic(toy_set, tmp_path):
    again = toy.make_toy(tmp_path / "a", seed=7, noise=0.25, **SMALL)
    assert _files(again) == _files(toy_set)
    assert _files(toy.make_toy(tmp_path / "b", seed=8, noise=0.25, **SMALL)) != _files(toy_set)
    # a fresh interpreter with another string-hash seed writes the same bytes (no set-order dependence)
    code = f"import toy; toy.make_toy({str(tmp_path / 'c')!r}, seed=7, noise=0.25, **{SMALL!r})"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(toy.__file__).parent,
                   env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert _files(tmp_path / "c") == _files(toy_set)


def test_toy_captions_describe_the_change(toy_set):
    scenes = json.loads((toy_set / "scenes.json").read_text())
    answers = json.loads((toy_set / "toy_test1_targets.json").read_text())
    for split in ("train", "val", "test1"):
        for r in json.loads((toy_set / f"captions/cap.rc2.{split}.json").read_text()):
            tgt = r.get("target_clean", r.get("target_hard", answers.get(str(r["pairid"]))))
            assert apply_edit(scenes[r["reference"]], r["caption"]) == scenes[tgt], r
    captions = json.loads((toy_set / "image_captions.json").read_text())
    for n, s in scenes.items():  # the exact caption of every scene
        assert captions[n] == " and ".join(f"a {o['size']} {o['color']} {o['shape']} at the {o['cell']}" for o in s)
        assert 1 <= len(s) <= 3 and len({o["cell"] for o in s}) == len(s)


def test_toy_structure(toy_set):
    scenes = json.loads((toy_set / "scenes.json").read_text())
    key = lambda n: json.dumps(scenes[n], sort_keys=True)
    queries, images = {}, {}
    for split in ("train", "val", "test1"):
        rows = json.loads((toy_set / f"captions/cap.rc2.{split}.json").read_text())
        split_file = json.loads((toy_set / f"image_splits/split.rc2.{split}.json").read_text())
        assert len(rows) == SMALL[{"train": "n_train", "val": "n_val", "test1": "n_test"}[split]]
        queries[split] = {(key(r["reference"]), r["caption"]) for r in rows}
        images[split] = {key(n) for n in split_file}
        for r in rows:
            m = r["img_set"]["members"]
            assert len(m) == 6 and len(set(m)) == 6 and r["reference"] in m and set(m) <= set(split_file)
            if split != "test1":
                assert r.get("target_clean", r["target_hard"]) in m
                assert m[r["img_set"]["target_rank"]] == r.get("target_clean", r["target_hard"])
            else:
                assert "target_hard" not in r
        for rel in split_file.values():
            with Image.open(toy_set / rel) as im:
                assert im.size == (64, 64) and im.mode == "RGB"
    assert not queries["val"] & queries["train"] and not queries["test1"] & queries["train"]
    assert not queries["val"] & queries["test1"]
    assert not images["val"] & images["train"] and not images["test1"] & images["train"]


def test_toy_noise_and_cirr_loader(toy_set, capsys):
    rows = json.loads((toy_set / "captions/cap.rc2.train.json").read_text())
    flags = [r["noisy"] for r in rows]
    assert sum(flags) == round(0.25 * 120)
    assert all((r["target_hard"] != r.get("target_clean", r["target_hard"])) == f for r, f in zip(rows, flags))
    ds = data.CIRR(toy_set, "train")
    assert "flat layout" in capsys.readouterr().out
    assert ds.noisy.tolist() == flags and len(ds) == 120 and len(ds.images) == 24 * 6
    ref, text, tgt, i = ds[0]
    assert ref.shape == (3, 64, 64) and text == rows[0]["caption"]
    both = data.CIRR(toy_set, "train", noise_ratio=0.5, noise_seed=2, return_images=False)
    _, injected = data.inject_noise(ds.triplets, ds.images, 0.5, 2)
    assert torch.equal(both.noisy, ds.noisy | injected)
    val = data.CIRR(toy_set, "val", return_images=False)
    assert len(val) == 40 and len(val.images) == 8 * 6 and all(t["target"] in t["members"] for t in val.triplets)
    assert len(data.CIRR(toy_set, "test1", view="gallery")) == 48


def test_extra_triplets(toy_set, tmp_path):
    extra = [dict(reference="train-0-1", target="train-1-2", text="a large red circle instead of a square")]
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    ds = data.CIRR(toy_set, "train", noise_ratio=0.5, extra_triplets=tmp_path / "extra.json", return_images=False)
    assert len(ds) == 121 and ds.triplets[-1]["text"] == extra[0]["text"] and not ds.noisy[-1]
    assert ds[120] == (ds.index["train-0-1"], extra[0]["text"], ds.index["train-1-2"], 120)
    with pytest.raises(ValueError, match="training images"):
        data.CIRR(toy_set, "train", extra_triplets=[dict(reference="nope", target="train-1-2", text="x")])


def test_ensure_toy(tmp_path, capsys):
    root = tmp_path / "toy"
    toy.ensure_toy(root, seed=1, **SMALL)
    assert "generating" in capsys.readouterr().out
    stamp = (root / "scenes.json").stat().st_mtime_ns
    assert toy.ensure_toy(root, seed=1, **SMALL) == root and "generating" not in capsys.readouterr().out
    assert (root / "scenes.json").stat().st_mtime_ns == stamp
    toy.ensure_toy(root, seed=2, **SMALL)  # other parameters: regenerated in place
    assert json.loads((root / "toy_params.json").read_text())["seed"] == 2
    assert not list(tmp_path.glob(".toy.tmp-*"))
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        toy.ensure_toy(other, **SMALL)
    assert toy.default_toy_root().name == "toy"

# ====================================================================================================
# wcb.py, nfb.py, loss.py
# ====================================================================================================

def _qt(B=8, M=None, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(M or B, D, generator=g), dim=-1).requires_grad_()
    return q, t


# ----------------------------------------------------------------------------- loss.py

def test_soft_nce_w1_is_info_nce_and_cross_entropy():
    tau = 0.05
    q, t = _qt()
    ref = F.cross_entropy(q @ t.T / tau, torch.arange(8))
    gq_ref, gt_ref = torch.autograd.grad(ref, (q, t))
    for fn in (lambda: info_nce(q, t, tau), lambda: soft_nce(q, t, torch.ones(8), tau)):
        out = fn()
        gq, gt = torch.autograd.grad(out, (q, t))
        assert torch.allclose(out, ref, atol=1e-6)
        assert torch.allclose(gq, gq_ref, atol=1e-5) and torch.allclose(gt, gt_ref, atol=1e-5)
    per = soft_nce(q, t, torch.ones(8), tau, reduction="none")
    assert per.shape == (8,) and torch.allclose(per, info_nce(q, t, tau, reduction="none"), atol=1e-6)


def test_soft_nce_matches_dense_target_and_w0_is_uniform_over_others():
    tau, B, M = 0.1, 6, 10                      # M > B: targets gathered from other ranks, pos given
    q, t = _qt(B, M)
    pos = torch.tensor([3, 0, 9, 1, 5, 5])
    logits = q @ t.T / tau
    for w in (torch.rand(B, generator=torch.Generator().manual_seed(1)), torch.zeros(B)):
        dense = ((1 - w) / (M - 1))[:, None].expand(B, M).clone()
        dense[torch.arange(B), pos] = w
        ref = F.cross_entropy(logits, dense, reduction="none")
        assert torch.allclose(soft_nce(q, t, w, tau, pos=pos, reduction="none"), ref, atol=1e-5)
    # w = 0: exactly the mean of -log p over the other M - 1 targets
    logp = logits.log_softmax(1)
    other = torch.stack([torch.cat([logp[i, :pos[i]], logp[i, pos[i] + 1:]]).mean() for i in range(B)])
    assert torch.allclose(soft_nce(q, t, torch.zeros(B), tau, pos=pos, reduction="none"), -other, atol=1e-5)


def test_bank_nce_hand_computed():
    # q0 = (1, 0), q1 = (0, 1); bank rows (1, 0), (0, 1), (-1, 0); tau = 0.5
    # logits: q0 -> [2, 0, -2], q1 -> [0, 2, 0]; targets 0 and 1
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    idx = torch.tensor([0, 1])
    # loss0 = log(1 + e^-2 + e^-4) = 0.1429316...; loss1 = log(1 + 2 e^-2) = 0.2395448...
    hard = bank_nce(q, bank, idx, 0.5, reduction="none")
    assert torch.allclose(hard, torch.tensor([0.14293163, 0.23954477]), atol=1e-6)
    # soft, w = (0.5, 1): loss0 = -0.5 log p00 - 0.25 (log p01 + log p02)
    #   log Z0 = 2 + 0.1429316 = 2.1429316; log p = [-0.1429316, -2.1429316, -4.1429316]
    #   loss0 = 0.0714658 + 0.25 * 6.2858633 = 1.6429316; loss1 unchanged
    soft = bank_nce(q, bank, idx, 0.5, w=torch.tensor([0.5, 1.0]), reduction="none")
    assert torch.allclose(soft, torch.tensor([1.64293163, 0.23954477]), atol=1e-6)
    assert torch.allclose(bank_nce(q, bank, idx, 0.5), hard.mean())


def test_bank_nce_with_batch_targets_equals_info_nce():
    q, t = _qt(8)
    w = torch.rand(8)
    assert torch.allclose(bank_nce(q, t, torch.arange(8), 0.02), info_nce(q, t, 0.02), atol=1e-6)
    assert torch.allclose(bank_nce(q, t, torch.arange(8), 0.02, w=w), soft_nce(q, t, w, 0.02), atol=1e-6)


def test_losses_under_autocast_are_fp32_and_close():
    q, t = _qt(16, D=32)
    w = torch.rand(16)
    ref = [info_nce(q, t, 0.01), soft_nce(q, t, w, 0.01), bank_nce(q, t, torch.arange(16), 0.01, w=w)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qb, tb = (q @ torch.eye(32)), (t @ torch.eye(32))   # bf16 activations, as from the model
        assert qb.dtype == torch.bfloat16
        out = [info_nce(qb, tb, 0.01), soft_nce(qb, tb, w, 0.01), bank_nce(qb, tb, torch.arange(16), 0.01, w=w)]
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32 and abs(o.item() - r.item()) < 0.05 * max(1.0, r.item())
    out[1].backward()                                       # gradients flow back to the fp32 leaves
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_loss_bad_input_messages():
    q, t = _qt(4)
    with pytest.raises(ValueError, match="loss.py"):
        info_nce(q, t[:, :3], 0.1)
    with pytest.raises(ValueError, match="loss.py"):
        soft_nce(q, t, torch.ones(3), 0.1)
    with pytest.raises(ValueError, match="loss.py"):
        info_nce(q, t[:2], 0.1)


# ----------------------------------------------------------------------------- nfb.py

def _bimodal(n, ratio, seed, gap=4.0):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.rand(n, generator=g) < ratio
    clean = (torch.randn(n, generator=g) * 0.6).abs()           # clean pairs: small losses
    bad = gap + torch.randn(n, generator=g)                     # noisy pairs: around log(B)-ish
    return torch.where(noisy, bad, clean), noisy


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7])
def test_torch_em_matches_sklearn(seed, ratio):
    losses, noisy = _bimodal(4000, ratio, seed, gap=2.0 + seed)   # overlap varies with the seed
    x = minmax(losses)
    a, b = fit_gmm(x, "sklearn"), fit_gmm(x, "torch")
    assert (a["clean"] - b["clean"]).abs().max() < 1e-2
    assert ((a["clean"] < 0.5) == (b["clean"] < 0.5)).float().mean() >= 0.99
    for k in ("means", "stds", "weights"):
        assert torch.allclose(a[k], b[k], atol=1e-6)
    assert a["n_iter"] == b["n_iter"] and a["means"][0] < a["means"][1]
    if seed >= 1:                                                  # separated modes
        assert detection_metrics(b["clean"], noisy)["auc"] >= 0.95


def test_clean_probability_device_dtype():
    losses, noisy = _bimodal(500, 0.3, 0)
    for backend in ("sklearn", "torch"):
        w = clean_probability(losses.half(), backend)
        assert w.dtype == torch.float32 and w.shape == (500,) and 0 <= w.min() and w.max() <= 1
        assert w[~noisy].mean() > 0.9 and w[noisy].mean() < 0.1


@pytest.mark.parametrize("case", ["equal", "nan", "inf", "few", "empty"])
@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_degenerate_inputs_give_ones_and_warn(case, backend):
    x = {"equal": torch.full((100,), 2.5), "few": torch.rand(9), "empty": torch.zeros(0),
         "nan": torch.rand(100).index_fill(0, torch.tensor([3]), math.nan),
         "inf": torch.rand(100).index_fill(0, torch.tensor([7]), math.inf)}[case]
    with pytest.warns(UserWarning, match="nfb.py"):
        w = clean_probability(x, backend)
    assert w.shape == x.shape and (w == 1).all()


def test_detection_metrics_hand_made():
    w = torch.tensor([0.9, 0.8, 0.4, 0.2, 0.6, 0.1])
    noisy = torch.tensor([False, False, False, True, True, True])
    m = detection_metrics(w, noisy)
    # flagged (w < 0.5): items 2, 3, 5 -> tp = 2 -> precision 2/3, recall 2/3
    # scores 1 - w: noisy {0.8, 0.4, 0.9} vs clean {0.1, 0.2, 0.6}: 8 of 9 pairs ordered right -> auc 8/9
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["auc"] == pytest.approx(8 / 9)


def test_noise_filter_warmup_update_stats_and_state(tmp_path):
    losses, noisy = _bimodal(300, 0.3, 1)
    nf = NoiseFilter(300, warmup_epochs=2, backend="torch", noisy_gt=noisy)
    assert not nf.active(0) and not nf.active(1) and nf.active(2)
    s0 = nf.update(losses, 0)                       # labels for epoch 1: still warm-up
    assert not s0["applied"] and (nf.weights == 1).all()
    s1 = nf.update(losses, 1)                       # labels for epoch 2: installed
    assert s1["applied"] and (nf.weights < 0.5).sum() == s1["n_noisy"] > 0
    for k in ("means", "stds", "mix", "n_noisy", "auc", "precision", "recall", "epoch", "mean_w"):
        assert k in s1
    assert s1["auc"] > 0.95 and s1["means"][0] < s1["means"][1] and len(nf.history) == 2
    # unseen pairs (NaN loss) keep their weight
    prev = nf.weights.clone()
    part = losses.clone()
    part[:50] = math.nan
    nf.update(part, 2)
    assert torch.equal(nf.weights[:50], prev[:50]) and nf.history[-1]["n_seen"] == 250
    # round trip through a weights_only checkpoint
    torch.save({"nfb": nf.state_dict()}, tmp_path / "c.pt")
    nf2 = NoiseFilter(300)
    nf2.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True)["nfb"])
    assert torch.equal(nf2.weights, nf.weights) and nf2.history == nf.history
    assert nf2.warmup_epochs == 2 and nf2.backend == "torch" and torch.equal(nf2.noisy_gt, noisy)
    with pytest.raises(ValueError, match="nfb.py"):
        nf.update(losses[:10], 3)


# ----------------------------------------------------------------------------- wcb.py

def test_wcb_identity_at_init_and_padding_zero():
    torch.manual_seed(0)
    wcb = WCB(16, n_maps=3, hidden=8)
    x, g = torch.randn(4, 7, 16), torch.randn(4, 16)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4, [True] + [False] * 6, [True] * 5 + [False] * 2])
    f, pen, att = wcb(x, mask, g)
    assert torch.equal(f, g) and pen.dim() == 0 and att.shape == (4, 7)
    assert (att[~mask] == 0).all() and (att[mask] > 0).all()
    assert torch.allclose(att.sum(1), torch.ones(4))
    f2, _, att2 = wcb(x, None, g)                   # no mask: all tokens weighted
    assert torch.equal(f2, g) and (att2 > 0).all()
    mask[2] = False                                 # all padding (never produced): no NaN, uniform map
    f3, pen3, att3 = wcb(x, mask, g)
    assert torch.isfinite(att3).all() and torch.isfinite(pen3) and torch.allclose(att3[2], torch.full((7,), 1 / 7))


def test_diversity_penalty_disjoint_zero_identical_positive():
    disjoint = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.3, 0.7]]])
    identical = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]])
    assert diversity_penalty(disjoint).item() == 0.0
    assert diversity_penalty(identical).item() == pytest.approx(2.0)   # K(K - 1)


def test_wcb_gradients_reach_alpha_and_scorer():
    torch.manual_seed(0)
    wcb = WCB(16)
    x, g = torch.randn(4, 5, 16), torch.randn(4, 16)
    f, pen, _ = wcb(x, None, g)
    (f.square().sum() + pen).backward()             # alpha = 0: only the penalty reaches the scorer
    assert wcb.alpha.grad.abs() > 0 and wcb.score.weight.grad.abs().sum() > 0
    wcb.zero_grad()
    with torch.no_grad():
        wcb.alpha.fill_(0.5)
    f, _, _ = wcb(x, None, g)
    f.square().sum().backward()                     # alpha != 0: the feature itself trains the scorer
    assert wcb.score.weight.grad.abs().sum() > 0


def test_wcb_autocast_bf16():
    torch.manual_seed(0)
    wcb = WCB(16)
    x, g = torch.randn(2, 5, 16), torch.randn(2, 16)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f, pen, att = wcb(x, mask, g)
    assert att.dtype == torch.float32 and pen.dtype == torch.float32 and torch.equal(f.float(), g)
    assert (att[~mask] == 0).all()
    with pytest.raises(ValueError, match="wcb.py"):
        WCB(16, n_maps=1)
