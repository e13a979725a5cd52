"""The test suite: `python -m pytest test_all.py`. The fast loop leaves out the end-to-end tests
(training runs, subprocesses of the scripts, torchrun and other multi-process tests):

    python -m pytest test_all.py -k "not e2e"

Every test checks real behaviour against an independent truth: OpenAI's CLIP code (`clip-anytorch`),
scikit-learn, hand-computed small cases, the real CIRR / FashionIQ / Shoes annotation files:
excerpts of them in testdata/ (cut by cut_excerpts, licences beside them), and the full files where
the environment variable NCLCIR_ANNOTATIONS names their folder (the tests that need them whole skip
without it, saying so). No test downloads anything. Tests are grouped by the file they check, in
reading order: model, preprocess, wcb, nfb, loss, triplets, data, toy, encode, evaluate, search,
audit, spn, train, runtime, util, plots, tools/; shared fixtures and helpers come first.
"""

from pathlib import Path
import functools
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
import warnings
from types import SimpleNamespace

from PIL import Image
from torch.utils.data import DataLoader
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model as M
# OpenAI's clip package, imported around its pkg_resources check
from tools.bench import reference_clip
import preprocess as TK
import audit
import data
import toy
import triplets
import encode
from encode import Encoder, ImageSource
from loss import gallery_nce, info_nce, soft_nce
from loss import text_nce as loss_text_nce
import nfb
from nfb import NoiseFilter, decide, decide_views, detection_metrics, fit_gmm, minmax
from wcb import WCB, diversity_penalty
import evaluate
import plots
import search
import runtime
import util
import train
from evaluate import (check_submission, cirr_metrics, cirr_rankings, fashioniq_metrics,
                      write_submission)
from model import CIRModel, CLIP
from preprocess import tokenize
import spn
from spn import TEMPLATES, generate_triplets

# ==================================================================================================
# shared: paths, the toy set, the micro CLIP, processes, placeholder data sets
# ==================================================================================================

REPO = Path(__file__).resolve().parent
# The real annotation files: excerpts in the repository (testdata/), the full files (cirr/,
# fashioniq/, shoes/) in the folder NCLCIR_ANNOTATIONS names. A test of the full files (the
# releases' counts, every caption through the tokenizer) skips without it; CI sets it.
EXCERPT = REPO / "testdata"
FULL = (Path(os.environ["NCLCIR_ANNOTATIONS"]).resolve() if os.environ.get("NCLCIR_ANNOTATIONS")
        else None)
needs_full = pytest.mark.skipif(FULL is None, reason="needs the full CIRR / FashionIQ / Shoes "
                                "annotation files: set NCLCIR_ANNOTATIONS to their folder "
                                "(README: Tests)")
# a test of the real files runs on the excerpts, and on the full files where they are
ANNOTATIONS = [pytest.param(EXCERPT, id="excerpt"), pytest.param(FULL, id="full", marks=needs_full)]

def is_full(path):
    """Is `path` (a file or folder of annotations) part of the full files?"""
    return FULL is not None and (Path(path) == FULL or FULL in Path(path).parents)

# The toy set of every test that reads one: 32 training groups (160 triplets over 192 images, a
# quarter of their targets wrong), 8 val and 8 test1 groups, 32-px images for the micro CLIP.
# Only the audit trains on another (why there).
TOY = dict(seed=3, noise=0.25, image_size=32, n_train=160, n_val=40, n_test=40)
# groups of 5 edits + the base
TOY_IMAGES = {"train": 160 // 5 * 6, "val": 40 // 5 * 6, "test1": 40 // 5 * 6}
# a CLIP small enough for a CPU test: 32 px, 4 patches of 16, width 64
MICRO = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64,
             vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=64,
             transformer_heads=1, transformer_layers=1)

@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return toy.make_toy(tmp_path_factory.mktemp("toy") / "toy", **TOY)

@pytest.fixture(scope="module")
def micro_clip(tmp_path_factory):
    """A saved micro CLIP state dict, loaded by path like any OpenAI checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "micro.pt"
    torch.save(CLIP(**MICRO).state_dict(), path)
    return path

@pytest.fixture(autouse=True)
def fresh_process_messages():
    """triplets.say prints a dataset's layout and noise lines once per process: each test starts as
    a fresh process."""
    util._SAID.clear()

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _cli(script, *args):
    r = subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    return r.returncode, r.stderr.strip().splitlines()

# ---- placeholder data sets -----------------------------------------------------------------------
# the real annotation files (the excerpts, or the full files: src), one tiny PNG hard-linked under
# every name they need

CIRR_ANN = EXCERPT / "cirr"
FIQ_ANN = EXCERPT / "fashioniq"
CATS = ("dress", "shirt", "toptee")

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

def make_cirr(tmp, splits=("val",), ann_sub="", img_sub="img_raw", drop=(), src=CIRR_ANN):
    """A CIRR root under tmp: annotations in tmp/ann_sub, images under tmp/img_sub (paths of the
    split files)."""
    ann = tmp / ann_sub
    png = _tiny_png(tmp)
    for s in splits:
        files = [f"image_splits/split.rc2.{s}.json"]
        files += [f"captions/cap.rc2.{s}.json"] if s != "train" else []
        for f in files:
            (ann / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / f, ann / f)
        if s == "train":
            continue
        for name, rel in json.loads((ann / files[0]).read_text()).items():
            if name not in drop:
                _link(png, tmp / img_sub / rel)
    return tmp

def make_cirr_train(tmp, n_rows=300):
    """cap.rc2.train.json is not in the annotation files: a train split made of real val rows (their
    img_set members included), with CIRR's nested train/<k>/ folders. Returns the rows."""
    rows = json.loads((CIRR_ANN / "captions/cap.rc2.val.json").read_text())[:n_rows]
    names = sorted({n for r in rows
                    for n in (r["reference"], r["target_hard"], *r["img_set"]["members"])})
    split = {n: f"./train/{k % 7}/{n}.png" for k, n in enumerate(names)}
    (tmp / "captions").mkdir(parents=True)
    (tmp / "image_splits").mkdir()
    (tmp / "captions/cap.rc2.train.json").write_text(json.dumps(rows))
    (tmp / "image_splits/split.rc2.train.json").write_text(json.dumps(split))
    png = _tiny_png(tmp)
    for n, rel in split.items():
        _link(png, tmp / "img_raw" / rel)
    return rows

def make_fiq(tmp, split="val", cats=CATS, ext=".png", ann_sub="", drop=(), src=FIQ_ANN):
    ann = tmp / ann_sub
    png = _tiny_png(tmp, ext)
    names = set()
    for c in cats:
        for f in (f"captions/cap.{c}.{split}.json", f"image_splits/split.{c}.{split}.json"):
            (ann / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / f, ann / f)
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

@pytest.fixture(scope="module", params=ANNOTATIONS)
def real_cirr(request, tmp_path_factory):
    """(root, annotation folder) of CIRR val and test1 from the excerpts, and from the full files
    where they are."""
    src = request.param / "cirr"
    return make_cirr(tmp_path_factory.mktemp("cirr"), splits=("val", "test1"), src=src), src

# the real annotation files, placeholder JPEGs where the Attribute Discovery archive puts them
SHOES_ANN = EXCERPT / "shoes"

def _shoes_rows(src=SHOES_ANN):
    return json.loads((src / "relative_captions_shoes.json").read_text())

def _shoes_names(split, src=SHOES_ANN):
    return (src / data.SHOES_SPLIT_FILES[split]).read_text().split()

def _pair(r):
    return r["ReferenceImageName"], r["ImageName"]

def _shoes_triplets(split, src=SHOES_ANN):
    """The rows of a split: both images in its split file, as the release assigns them."""
    names = set(_shoes_names(split, src))
    return [r for r in _shoes_rows(src) if set(_pair(r)) <= names]

def make_shoes(tmp, splits=("train", "test"), top="", ann_sub="", flat=False, drop=(), rows=None,
               names=None):
    """A Shoes root under tmp: annotations in tmp/ann_sub (the excerpt's files, or `rows` / `names`
    {split: [name]} written in their format), one tiny JPEG hard-linked under every image name of
    `splits` but `drop`: tmp/top/womens_<category>/<0|1>/<name> as the archive unpacks, or flat."""
    ann = tmp / ann_sub
    ann.mkdir(parents=True, exist_ok=True)
    rows = _shoes_rows() if rows is None else rows
    names = names or {s: _shoes_names(s) for s in data.SHOES_SPLITS}
    (ann / "relative_captions_shoes.json").write_text(json.dumps(rows))
    for s, f in data.SHOES_SPLIT_FILES.items():
        (ann / f).write_text("\n".join(names[s]) + "\n")
    jpg = _tiny_png(tmp, ".jpg")
    for s in splits:
        for n in set(names[s]) - set(drop):
            category = n.removeprefix("img_").rsplit("_", 1)[0]         # womens_<category>
            sub = "" if flat else f"{category}/{int(n[:-4].rsplit('_', 1)[1]) % 2}"
            _link(jpg, tmp / top / sub / n)
    return tmp

@pytest.fixture(scope="module")
def shoes_root(tmp_path_factory):
    return make_shoes(tmp_path_factory.mktemp("shoes"))

# ==================================================================================================
# model.py (CLIP + CIRModel)
# ==================================================================================================

TEXT = dict(context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
            transformer_layers=2)
SMALL_CLIP = {
    "vit": dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=128,
                vision_patch_size=8, **TEXT),
    "rn": dict(embed_dim=64, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=16,
               vision_patch_size=None, **TEXT),
}
# (embed, resolution, vision layers, vision width, patch, text width, text heads, text layers)
RELEASED = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 512, 8, 12),
    "RN50x4": (640, 288, (4, 6, 10, 6), 80, None, 640, 10, 12),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, None, 768, 12, 12),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, None, 1024, 16, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 768, 12, 12),
    "ViT-L/14@336px": (768, 336, 24, 1024, 14, 768, 12, 12),
}
CAPTIONS = ["a photo of a cat", "make the red circle blue",
            "Remove the dog and add two people on the beach at sunset", "x"]

def _reference_model(kind, seed=0):
    """Reference CLIP with every weight and BatchNorm statistic randomised (so no zero-init hides a
    bug)."""
    torch.manual_seed(seed)
    ref = reference_clip().model.CLIP(**SMALL_CLIP[kind]).eval()
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point() and t.dim() > 0:
                t.copy_(torch.randn_like(t) * 0.1)
    return ref

def _close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())

# ---- parity with OpenAI's model ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_parity_with_reference(kind):
    torch.set_num_threads(2)
    ref = _reference_model(kind)
    ours = M.build_clip(ref.state_dict())
    res = SMALL_CLIP[kind]["image_resolution"]
    images = torch.randn(3, 3, res, res)
    text = TK.tokenize(CAPTIONS)
    with torch.no_grad():
        assert _close(ours.encode_image(images), ref.encode_image(images))
        assert _close(ours.encode_text(text), ref.encode_text(text))
        for a, b in zip(ours(images, text), ref(images, text)):
            assert _close(a, b, 1e-4)
        # token outputs: the global token is exactly the usual feature
        img_tok = ours.encode_image_tokens(images)
        m = (res // 8) ** 2 if kind == "vit" else (res // 32) ** 2
        assert img_tok.shape == (3, 1 + m, 64)
        assert torch.equal(img_tok[:, 0], ours.encode_image(images))
        x, mask, eot = ours.encode_text_tokens(text)
        assert torch.equal(eot, text.argmax(-1)) and x.shape == (4, int(eot.max()) + 1, 64)
        assert torch.equal(x[torch.arange(4), eot], ours.encode_text(text))
        assert torch.equal(mask, torch.arange(x.shape[1]) <= eot[:, None]) and mask[:, 0].all()

        # every token against the reference's own layers, evaluated at every position
        t = ref.token_embedding(text) + ref.positional_embedding
        t = ref.transformer(t.permute(1, 0, 2)).permute(1, 0, 2)
        t = ref.ln_final(t) @ ref.text_projection                                       # (B, 77, D)
        assert _close(x[mask], t[:, :x.shape[1]][mask])
        v = ref.visual
        if kind == "vit":
            p = v.conv1(images).flatten(2).transpose(1, 2)
            p = torch.cat([v.class_embedding.expand(3, 1, -1), p], 1) + v.positional_embedding
            p = v.transformer(v.ln_pre(p).permute(1, 0, 2)).permute(1, 0, 2)
            want = v.ln_post(p) @ v.proj                                             # (B, 1+m, D)
        else:
            f = v.relu3(v.bn3(v.conv3(v.relu2(v.bn2(v.conv2(v.relu1(v.bn1(v.conv1(images)))))))))
            f = v.layer4(v.layer3(v.layer2(v.layer1(v.avgpool(f)))))
            f = f.flatten(2).permute(2, 0, 1)
            f = torch.cat([f.mean(0, keepdim=True), f]) + v.attnpool.positional_embedding[:, None]
            ap = v.attnpool
            want, _ = F.multi_head_attention_forward(
                f, f, f, f.shape[-1], ap.num_heads, None,
                torch.cat([ap.q_proj.bias, ap.k_proj.bias, ap.v_proj.bias]), None, None, False, 0.0,
                ap.c_proj.weight, ap.c_proj.bias, training=False, need_weights=False,
                use_separate_proj_weight=True, q_proj_weight=ap.q_proj.weight,
                k_proj_weight=ap.k_proj.weight, v_proj_weight=ap.v_proj.weight)
            want = want.transpose(0, 1)                                             # (B, 1+hw, D)
        assert _close(img_tok, want)

def test_text_trimming_is_invisible():
    """Positions after the batch's last EOT are cut; a caption's outputs do not depend on its
    batch-mates."""
    ours = M.build_clip(_reference_model("vit").state_dict())
    text = TK.tokenize(CAPTIONS)
    with torch.no_grad():
        together = ours.encode_text(text)
        alone = torch.cat([ours.encode_text(text[i:i + 1]) for i in range(len(text))])
        x, mask, _ = ours.encode_text_tokens(text[3:4])            # "x": SOT x EOT -> 3 tokens
    assert _close(together, alone) and x.shape[1] == 3 and mask.all()

# ---- architecture inference ----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(RELEASED))
def test_infer_config_released_models(name):
    e, res, vl, vw, patch, tw, th, tl = RELEASED[name]
    cfg = dict(embed_dim=e, image_resolution=res, vision_layers=vl, vision_width=vw,
               vision_patch_size=patch, context_length=77, vocab_size=49408, transformer_width=tw,
               transformer_heads=th, transformer_layers=tl)
    with torch.device("meta"):                              # shapes only: no memory, no init time
        sd = reference_clip().model.CLIP(**cfg).state_dict()
    sd.update(input_resolution=torch.tensor(res), context_length=torch.tensor(77),
              vocab_size=torch.tensor(49408))
    assert M.infer_config(sd) == cfg
    model = M.build_clip(sd)                                # builds on meta, like the shapes it got
    ours = model.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {
        k: v.shape for k, v in sd.items() if k not in M._ARCHIVE_EXTRAS}
    assert model.image_resolution == res and model.embed_dim == e and model.context_length == 77

@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
def test_tiny_configs(name):
    model, preprocess = M.load_clip(name, device="cpu")
    cfg = M.TINY_CONFIGS[name]
    assert M.infer_config(model.state_dict()) == cfg   # a saved tiny model rebuilds the same
    img = preprocess(Image.new("RGB", (80, 70), (200, 30, 30)))[None]
    res = cfg["image_resolution"]                      # tiny: 48 px, 3 x 3 patches (the toy's grid)
    assert img.shape == (1, 3, res, res) and res == {"tiny": 48, "tiny-rn": 64}[name]
    text = TK.tokenize(["make the red circle blue", "remove the triangle"])
    with torch.no_grad():
        assert model.encode_image(img).shape == (1, 128)
        assert model.encode_text(text).shape == (2, 128)
        rebuilt = M.build_clip(model.state_dict())
        assert torch.equal(rebuilt.encode_text(text), model.encode_text(text))
    model.train()                                   # trains from scratch: gradients flow everywhere
    logits, _ = model(torch.randn(2, 3, res, res), text)
    logits.logsumexp(1).sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    x, mask, _ = model.encode_text_tokens(text)               # token outputs are differentiable too
    (x[mask].sum() + model.encode_image_tokens(torch.randn(2, 3, res, res)).sum()).backward()
    if name == "tiny-rn":                           # OpenAI's init: residual branches start at zero
        assert all(p.abs().sum() == 0 for n, p in model.visual.named_parameters()
                   if n.endswith("bn3.weight") and n.startswith("layer"))
    w = model.transformer.width
    assert abs(model.text_projection.std().item() - w ** -0.5) < 0.2 * w ** -0.5

def test_build_clip_converts_to_fp32_and_copies():
    ref = _reference_model("vit")
    sd = {k: v.half() if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    model = M.build_clip(sd)
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training
    sd32 = ref.state_dict()
    model = M.build_clip(sd32)
    with torch.no_grad():
        model.text_projection.zero_()
    assert sd32["text_projection"].abs().sum() > 0      # no memory shared with the caller's tensors

# ---- loading files -------------------------------------------------------------------------------

def _tiny_reference():
    ref = _reference_model("vit")
    return ref, ref.state_dict()

def _check_same(model, ref):
    text, img = TK.tokenize(CAPTIONS), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _close(model.encode_text(text), ref.encode_text(text))
        assert _close(model.encode_image(img), ref.encode_image(img))

def test_load_torchscript_archive(tmp_path):
    """Released checkpoints are traced TorchScript archives with 3 extra attributes in their state
    dict."""
    ref, _ = _tiny_reference()
    for key, val in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        ref.__dict__.pop(key, None)                # a plain int attribute in the reference
        ref.register_buffer(key, torch.tensor(val))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")            # tracer's notes on the reference's Python checks
        traced = torch.jit.trace(ref, (torch.randn(1, 3, 32, 32), TK.tokenize("a cat")),
                                 check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    traced.save(str(path))
    model, preprocess = M.load_clip(path, device="cpu")
    _check_same(model, ref)
    assert preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)

def test_load_state_dict_files(tmp_path):
    ref, sd = _tiny_reference()
    for i, obj in enumerate([sd, {"state_dict": sd}, {"model": sd, "epoch": 3}]):
        torch.save(obj, tmp_path / f"{i}.pt")
        model, _ = M.load_clip(str(tmp_path / f"{i}.pt"), device="cpu")
        _check_same(model, ref)

def test_bad_files_and_names(tmp_path):
    with pytest.raises(ValueError,
                       match=r"unknown CLIP model 'ViT-X/99'.*RN50x64.*ViT-B/32.*tiny-rn"):
        M.load_clip("ViT-X/99")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError,
                       match=r"notes\.txt: neither a TorchScript archive nor a state dict"):
        M.load_clip(txt)
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ValueError, match=r"other\.pt: not a CLIP state dict: "
                                         r"missing keys \['text_projection'"):
        M.load_clip(other)
    torch.save([1, 2, 3], other)
    with pytest.raises(ValueError, match=r"other\.pt: holds a list, expected a CLIP state dict"):
        M.load_clip(other)
    _, sd = _tiny_reference()
    del sd["visual.ln_post.weight"], sd["transformer.resblocks.1.mlp.c_fc.bias"]
    partial = tmp_path / "partial.pt"
    torch.save(sd, partial)
    with pytest.raises(ValueError, match=r"partial\.pt: .*2 missing keys "
                                         r".*visual\.ln_post\.weight.*c_fc\.bias"):
        M.load_clip(partial)
    with pytest.raises(ValueError, match="unexpected.*extra"):
        M.build_clip({**_tiny_reference()[1], "extra": torch.zeros(1)})

# ---- download ------------------------------------------------------------------------------------

def _serve(tmp_path, payload, sha=None):
    """Write payload where a file:// URL names sha (default: its true hash) as its folder, like
    OpenAI's URLs."""
    sha = sha or hashlib.sha256(payload).hexdigest()
    src = tmp_path / "server" / sha / "Tiny-1.pt"
    src.parent.mkdir(parents=True)
    src.write_bytes(payload)
    return src.as_uri()

@pytest.fixture
def count_urlopen(monkeypatch):
    calls = []
    real = urllib.request.urlopen

    def counting(url, *a, **k):
        calls.append(url)
        return real(url, *a, **k)

    monkeypatch.setattr(urllib.request, "urlopen", counting)
    return calls

def test_download_verifies_and_caches(tmp_path, monkeypatch, count_urlopen):
    ref, sd = _tiny_reference()
    torch.save(sd, tmp_path / "sd.pt")
    monkeypatch.setitem(M.MODEL_URLS, "Tiny/1", _serve(tmp_path, (tmp_path / "sd.pt").read_bytes()))
    assert "Tiny/1" in M.available_models()
    model, _ = M.load_clip("Tiny/1", device="cpu", download_root=tmp_path / "cache")
    _check_same(model, ref)
    assert (tmp_path / "cache" / "Tiny-1.pt").is_file() and len(count_urlopen) == 1
    # cached and verified: no download
    M.load_clip("Tiny/1", device="cpu", download_root=tmp_path / "cache")
    assert len(count_urlopen) == 1
    (tmp_path / "cache" / "Tiny-1.pt").write_bytes(b"corrupted")        # bad cache -> fetched again
    with pytest.warns(UserWarning, match="cached.*mismatch"):
        M.load_clip("Tiny/1", device="cpu", download_root=tmp_path / "cache")
    assert len(count_urlopen) == 2

def test_download_hash_mismatch_retries_once_then_fails(tmp_path, monkeypatch, count_urlopen):
    monkeypatch.setitem(M.MODEL_URLS, "Tiny/1", _serve(tmp_path, b"not the file", sha="0" * 64))
    with pytest.warns(UserWarning, match="mismatch"), \
            pytest.raises(OSError, match="does not match 0000"):
        M.load_clip("Tiny/1", device="cpu", download_root=tmp_path / "cache")
    assert len(count_urlopen) == 2 and not any((tmp_path / "cache").iterdir())

def test_download_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    url = (tmp_path / "nowhere" / ("a" * 64) / "Tiny-1.pt").as_uri()
    monkeypatch.setitem(M.MODEL_URLS, "Tiny/1", url)
    with pytest.raises(ConnectionError,
                       match=r"by hand and put it at .*cache.Tiny-1\.pt \(sha256 aaaa"):
        M.load_clip("Tiny/1", device="cpu", download_root=tmp_path / "cache")

# ---- CIRModel: CLIP with three WCB heads ---------------------------------------------------------

def test_cir_model_is_the_clip_sum_without_wcb_and_at_init():
    """q = normalize(f_txt + f_ref), t = normalize(f_tar) from OpenAI's own features: without WCB
    heads (CLIP4Cir's sum baseline) and with heads at init (α = 0); cached tokens and SPN's
    cached f_ref give the same q."""
    ref = _reference_model("vit")
    clip = M.build_clip(ref.state_dict())
    text, a, b = TK.tokenize(CAPTIONS[:3]), torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want_q = F.normalize(ref.encode_text(text) + ref.encode_image(a), dim=-1)
        want_t = F.normalize(ref.encode_image(b), dim=-1)
        for wcb in (False, True):
            model = CIRModel(clip, wcb=wcb).eval()
            q, t, pen = model(text, a, b)                                   # images
            assert _close(q, want_q) and _close(t, want_t) and (pen == 0) == (not wcb)
            tok_a, tok_b = model.image_tokens(a), model.image_tokens(b)
            q2, t2, _ = model(text, M.Tokens(tok_a), M.Tokens(tok_b))   # a frozen tower's tokens
            assert _close(q2, q) and _close(t2, t)
            f_ref, _ = model.image_features(model.image_tokens(a), "ref")
            q3, t3, _ = model(text, M.Features(f_ref))              # SPN stage 2: f_ref, no target
            assert _close(q3, q) and t3 is None
            assert _close(M.compose(model.text_features(text)[0], f_ref), q)
    assert not clip.logit_scale.requires_grad             # τ is fixed: CLIP's scale is not trained
    assert sum(k.startswith("wcb_") for k in CIRModel(clip, wcb=False).state_dict()) == 0

def test_each_distinct_image_goes_through_the_tower_once(monkeypatch):
    """A group batch repeats its reference: the tower sees each distinct image once, and q, t and
    every gradient are those of the whole batch; with BatchNorm in training (ModifiedResNet) the
    batch is kept whole."""
    x = torch.rand(6, 3, 8, 8)
    x[1], x[4] = x[0], x[0]
    u, rows = M.distinct(x)
    assert len(u) == 4 and torch.equal(u[rows], x)
    assert M.distinct(torch.rand(5, 3, 8, 8))[1] is None            # all distinct: nothing to share
    torch.manual_seed(0)
    model = CIRModel(M.load_clip("tiny", device="cpu")[0]).train()
    text = TK.tokenize(["a red cube", "bigger", "a blue ball", "remove it"])
    ref = torch.rand(1, 3, 48, 48).expand(4, -1, -1, -1).clone()       # one reference, four queries
    tgt = torch.rand(4, 3, 48, 48)

    def step():
        seen = []
        hook = model.clip.visual.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
        model.zero_grad()
        q, t, pen = model(text, ref, tgt)
        (q @ t.t()).logsumexp(1).mean().add(pen).backward()
        hook.remove()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return seen, q.detach(), t.detach(), grads

    seen, q, t, grads = step()
    assert seen == [5]                                              # 1 reference + 4 targets, not 8
    monkeypatch.setattr(M, "distinct", lambda x: (x, None))         # every image through the tower
    seen2, q2, t2, grads2 = step()
    assert seen2 == [8] and _close(q, q2) and _close(t, t2)
    assert len(grads) == len(grads2) and all(_close(g, g2) for g, g2 in zip(grads, grads2))
    monkeypatch.undo()
    resnet = CIRModel(M.load_clip("tiny-rn", device="cpu")[0]).train()
    seen = []
    resnet.clip.visual.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    big = torch.rand(1, 3, 64, 64).expand(4, -1, -1, -1)                     # tiny-rn's 64 px
    resnet(text, big, torch.rand(4, 3, 64, 64))
    assert seen == [8]

# ==================================================================================================
# preprocess.py
# ==================================================================================================

# ---- the image transforms ------------------------------------------------------------------------

def test_clip_transform_matches_reference():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (150, 230, 3), dtype=np.uint8))
    ref = reference_clip().clip._transform(224)
    for im in (img, img.convert("L"), img.convert("RGBA")):
        assert torch.equal(TK.make_transform("clip", 224)(im), ref(im))
    with pytest.raises(ValueError, match="targetpad"):
        TK.make_transform("squash")

def test_targetpad_transform():
    wide = Image.new("RGB", (300, 100), (255, 255, 255))                # ratio 3 -> padded to 1.25
    padded = TK.target_pad(wide, 1.25)
    assert padded.size == (300, 100 + 2 * 70) and padded.getpixel((0, 0)) == (0, 0, 0)
    assert padded.getpixel((150, 120)) == (255, 255, 255)               # image centred
    out = TK.make_transform("targetpad", 64)(wide)
    black = (torch.zeros(3) - torch.tensor(TK.CLIP_MEAN)) / torch.tensor(TK.CLIP_STD)
    # black border kept
    assert out.shape == (3, 64, 64) and torch.allclose(out[:, 0, 32], black, atol=1e-4)
    assert out[:, 32, 32].gt(1).all()                                  # white centre
    square = Image.new("RGB", (110, 100), (10, 200, 30))               # ratio 1.1 < 1.25: untouched
    assert torch.equal(TK.make_transform("targetpad", 64)(square),
                       TK.make_transform("clip", 64)(square))

@pytest.mark.parametrize("name", ["clip", "targetpad"])
def test_decoded_pixels_give_the_transform_exactly(name):
    """The decoded-image cache stores uint8 rows; normalize_pixels must give the full transform's
    float tensor."""
    rng = np.random.default_rng(1)
    for size in ((64, 64), (150, 90)):
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        px = TK.make_transform(name, 48, pixels=True)(img)
        assert px.dtype == torch.uint8 and px.shape == (3, 48, 48)
        assert torch.equal(TK.normalize_pixels(px[None])[0], TK.make_transform(name, 48)(img))

# ---- the tokenizer -------------------------------------------------------------------------------

def _all_captions(ann):
    caps = []
    for f in ("cap.rc2.val.json", "cap.rc2.test1.json"):
        caps += [t["caption"] for t in json.loads((ann / "cirr/captions" / f).read_text())]
    for f in sorted(glob.glob(str(ann / "fashioniq/captions/*.json"))):
        caps += [c for t in json.loads(Path(f).read_text()) for c in t["captions"]]
    shoes = json.loads((ann / "shoes" / data.SHOES_CAPTIONS).read_text())
    caps += [r["RelativeCaption"] for r in shoes]
    return sorted(set(caps))

@pytest.mark.parametrize("ann", ANNOTATIONS)
def test_tokenizer_matches_reference_on_all_dataset_captions(ann):
    caps = _all_captions(ann)
    assert len(caps) > (50000 if is_full(ann) else 2000)
    assert torch.equal(TK.tokenize(caps, truncate=True),
                       reference_clip().tokenize(caps, truncate=True))

EDGE = ["", " ", "\n\t ", "&amp;amp;", "Tom &amp; Jerry &lt;3 &#39;hi&#39; &nbsp;x", "schÃ¶n",
        "doesnÃ¢â‚¬â„¢t", "café naïve Ångström", "👍🏽 emoji 🐶🐱 ❤️",
        "猫がいます 中文字符 한국어", "multiple   spaces\n\nand\r\nnewlines\t\ttabs",
        "<|startoftext|> hi <|endoftext|>", "<|ENDOFTEXT|>", "İstanbul ǅ ß ﬁ",
        "don't I'll we've they're", "3.14 1e10", "\u200b zero\u00a0width \u3000 ideographic",
        "\x1c\x1d\x1e\x1f seps", "ＦＵＬＬＷＩＤＴＨ", "\ufeffbom", "!!!???..,,",
        "a" * 300, "word " * 80, "👍" * 40]

@pytest.mark.parametrize("context_length", [77, 8])
def test_tokenizer_edge_cases(context_length):
    clip = reference_clip()
    for text in EDGE:
        want = clip.tokenize(text, context_length, truncate=True)
        got = TK.tokenize(text, context_length, truncate=True)
        assert got.dtype == torch.long and torch.equal(got, want), text
        try:
            want = clip.tokenize([text], context_length)
        except RuntimeError:
            with pytest.raises(RuntimeError, match="too long"):
                TK.tokenize([text], context_length)
        else:
            assert torch.equal(TK.tokenize([text], context_length), want)
    assert TK.tokenize([]).shape == (0, 77)
    long = TK.tokenize("word " * 80, truncate=True)[0]
    assert long[-1] == 49407 and long.argmax() == 76                 # EOT kept as the last token

def test_corrupt_or_missing_vocabulary(tmp_path):
    bad = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    raw = bytearray(TK.VOCAB.read_bytes())
    raw[100] ^= 1
    bad.write_bytes(bytes(raw))
    with pytest.raises(OSError, match=r"bpe_simple_vocab_16e6\.txt\.gz: corrupt"):
        TK.load_bpe(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        TK.load_bpe(tmp_path / "missing.txt.gz")

# ==================================================================================================
# wcb.py
# ==================================================================================================

def test_wcb_identity_at_init_and_padding_zero():
    torch.manual_seed(0)
    wcb = WCB(16, n_maps=3, hidden=8)
    x, g = torch.randn(4, 7, 16), torch.randn(4, 16)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4, [True] + [False] * 6,
                         [True] * 5 + [False] * 2])
    f, pen, att = wcb(x, mask, g)
    assert torch.equal(f, g) and pen.dim() == 0 and att.shape == (4, 7)
    assert (att[~mask] == 0).all() and (att[mask] > 0).all()
    assert torch.allclose(att.sum(1), torch.ones(4))
    f2, _, att2 = wcb(x, None, g)                # no mask: all tokens weighted
    assert torch.equal(f2, g) and (att2 > 0).all()
    mask[2] = False                              # all padding (never produced): no NaN, uniform map
    f3, pen3, att3 = wcb(x, mask, g)
    assert torch.isfinite(att3).all() and torch.isfinite(pen3)
    assert torch.allclose(att3[2], torch.full((7,), 1 / 7))

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
    f.square().sum().backward()                   # alpha != 0: the feature itself trains the scorer
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

# ==================================================================================================
# nfb.py
# ==================================================================================================

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

def test_decide_device_dtype():
    losses, noisy = _bimodal(500, 0.3, 0)
    for backend in ("sklearn", "torch"):
        w = decide(losses.half(), backend)["w"]
        assert w.dtype == torch.float32 and w.shape == (500,) and 0 <= w.min() and w.max() <= 1
        assert w[~noisy].mean() > 0.9 and w[noisy].mean() < 0.1

@pytest.mark.parametrize("case", ["equal", "nan", "inf", "few", "empty"])
@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_degenerate_inputs_give_ones_and_warn(case, backend):
    x = {"equal": torch.full((100,), 2.5), "few": torch.rand(9), "empty": torch.zeros(0),
         "nan": torch.rand(100).index_fill(0, torch.tensor([3]), math.nan),
         "inf": torch.rand(100).index_fill(0, torch.tensor([7]), math.inf)}[case]
    with pytest.warns(UserWarning, match="nfb.py"):
        w = decide(x, backend)["w"]
    assert w.shape == x.shape and (w == 1).all()

def test_detection_metrics_hand_made():
    w = torch.tensor([0.9, 0.8, 0.4, 0.2, 0.6, 0.1])
    noisy = torch.tensor([False, False, False, True, True, True])
    m = detection_metrics(w, noisy)
    # flagged (w < 0.5): items 2, 3, 5 -> tp = 2 -> precision 2/3, recall 2/3
    # scores 1 - w: noisy {0.8, 0.4, 0.9} vs clean {0.1, 0.2, 0.6}: 8 of 9 pairs ordered right ->
    # auc 8/9
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
    assert nf2.warmup_epochs == 2 and nf2.backend == "torch" and torch.equal(nf2.truth.noisy, noisy)
    with pytest.raises(ValueError, match="nfb.py"):
        nf.update(losses[:10], 3)

def test_carry_over_installs_stage_1_labels_without_a_warm_up():
    """SPN's stage 2: the noise filter takes stage 1's soft labels (a copy) and uses them from
    epoch 0."""
    losses, _ = _bimodal(300, 0.3, 1)
    stage1 = NoiseFilter(300, warmup_epochs=0, backend="torch")
    stage1.update(losses, 0)
    sd, w1 = stage1.state_dict(), stage1.weights.clone()
    nf = NoiseFilter(300, warmup_epochs=2)
    assert not nf.active(0)
    nf.carry_over(sd)
    assert nf.active(0) and torch.equal(nf.weights, w1) and (w1 < 0.5).any() and (w1 > 0.5).any()
    sd["weights"].fill_(0.5)                        # a copy: stage 1's tensor is not shared
    assert torch.equal(nf.weights, w1)
    msg = "nfb.py: stage 1's noise filter has 300 pairs, this run 200"
    with pytest.raises(ValueError, match=msg):
        NoiseFilter(200).carry_over(sd)

@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_soft_label_never_rises_with_the_loss(backend):
    """A narrow clean mode and a wide noisy one: the raw GMM posterior of the clean component falls
    again in the far left tail (the wide component out-weighs it there); w is held at the clean
    mean's value instead."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([0.3 + 0.02 * torch.randn(700, generator=g),
                   0.5 + 0.25 * torch.randn(300, generator=g)])
    x = torch.cat([x, torch.tensor([-0.5])])                           # one very easy pair
    w = decide(x, backend)["w"]
    order = x.argsort()
    assert (w[order].diff() <= 1e-6).all() and w[-1] == w.max()
    fit = fit_gmm(minmax(x), backend)
    assert fit["stds"][1] > 3 * fit["stds"][0]                        # the case the rule is for

def test_gamma_loglik_matches_scipy():
    from scipy import stats
    torch.manual_seed(0)
    for shape in (0.7, 2.0, 9.0):
        x = torch.distributions.Gamma(shape, 1.5).sample((4000,)).double()
        want = stats.gamma.logpdf(x.numpy(), *stats.gamma.fit(x.numpy(), floc=0)).mean()
        assert abs(nfb.gamma_loglik(x) - want) < 1e-6
    assert math.isnan(nfb.gamma_loglik(torch.full((20,), 3.0)))

def test_second_mode_gate_keeps_one_skewed_mode_clean():
    """A clean loss distribution is one skewed mode: the GMM still cuts it in two (about half the
    pairs below 0.5), but a Gamma fits it as well or better (excess <= 0), so the gate keeps every
    w = 1. A mode of noisy pairs far out is what the Gamma cannot follow."""
    torch.manual_seed(0)
    clean = torch.distributions.Gamma(2.0, 1.0).sample((6000,))
    fit = fit_gmm(minmax(clean))
    assert (fit["clean"] < 0.5).float().mean() > 0.2                             # the ungated split
    assert nfb.second_mode(clean, minmax(clean), fit)["excess"] < 0.02      # the Gamma fits as well
    assert (decide_views({"q": clean}, ["q"], gate=0.05)[0] == 1).all()
    noisy = torch.cat([clean[:4800], 12 + 2 * torch.randn(1200).abs()])
    assert nfb.second_mode(noisy, minmax(noisy), fit_gmm(minmax(noisy)))["excess"] > 0.1
    w = decide_views({"q": noisy}, ["q"], gate=0.05)[0]
    assert (w[4800:] < 0.5).float().mean() > 0.95 and (w[:4800] < 0.5).float().mean() < 0.05
    nf = NoiseFilter(6000, warmup_epochs=0, gate=0.05)
    assert nf.update(clean, 0)["gated"] and (nf.weights == 1).all()
    assert not nf.update(noisy, 1)["gated"] and (nf.weights[4800:] < 0.5).all()

def test_width_gate_keeps_two_clean_humps_of_one_width_clean():
    """Late in training a clean loss distribution can grow a second hump (hard against easy edits):
    two Gaussians then beat one Gamma (excess > gate), but the two components are about equally
    wide, unlike the wide mode that wrong targets add. The parameters are those the GMM fitted to a
    clean toy run's losses after epoch 6."""
    g = torch.Generator().manual_seed(0)
    humps = torch.cat([1.42 + 0.57 * torch.randn(2880, generator=g),
                       2.64 + 0.59 * torch.randn(3120, generator=g)]).clamp(min=0.05)
    mode = nfb.second_mode(humps, minmax(humps), fit_gmm(minmax(humps)))
    assert mode["excess"] > 0.05 and 0.8 < mode["width"] < 1.25        # the excess test alone opens
    # the width test keeps w = 1
    assert (decide_views({"q": humps}, ["q"], gate=0.02)[0] == 1).all()
    assert not nfb.is_noise(mode, 0.02) and nfb.is_noise(mode, 0)               # gate 0: no gate
    # wrong targets: far and wide
    wide = torch.cat([humps[:4800], 12 + 2 * torch.randn(1200, generator=g).abs()])
    w = decide_views({"q": wide}, ["q"], gate=0.02)[0]
    assert (w[4800:] < 0.5).float().mean() > 0.95
    nf = NoiseFilter(6000, warmup_epochs=0, gate=0.02)
    assert nf.update(humps, 0)["gated"] and not nf.update(wide, 1)["gated"]
    sd = nf.state_dict()
    again = NoiseFilter(6000)
    again.load_state_dict(sd)
    assert again.gate == 0.02

def _view_features(n=40, U=9, N=30, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    pf = nfb.PairFeatures(f_txt=torch.randn(U, D, generator=g),
                          text_idx=torch.randint(0, U, (n,), generator=g),
                          f_ref=torch.randn(n, D, generator=g),
                          gallery=F.normalize(torch.randn(N, D, generator=g), dim=-1),
                          tgt_idx=torch.randint(0, N, (n,), generator=g),
                          ref_idx=torch.randint(0, N, (n,), generator=g))
    return pf

def test_pair_views_against_loops():
    """Every view of nfb.pair_views against a plain loop over the pairs: query (the composed query
    over the gallery, reference removed), text (each text composed with the pair's reference, the
    texts' scores normalised over the pairs, then a softmax over the texts), change."""
    pf, tau, temp = _view_features(), 0.1, nfb.TEXT_TEMP
    v = nfb.pair_views(pf, nfb.VIEWS, tau)
    n, U = len(pf.f_ref), len(pf.f_txt)
    cos = lambda a, b: (F.normalize(a, dim=0) @ F.normalize(b, dim=0)).item()
    S = torch.tensor([[cos(pf.f_txt[k] + pf.f_ref[i], pf.gallery[pf.tgt_idx[i]]) for i in range(n)]
                      for k in range(U)]) / (tau * temp)                              # (U, n)
    hub = S.logsumexp(1, keepdim=True)
    for i in range(n):
        k, t, r = pf.text_idx[i], pf.gallery[pf.tgt_idx[i]], pf.f_ref[i]
        q = pf.f_txt[k] + r
        keep = [j for j in range(len(pf.gallery))
                if j != pf.ref_idx[i] or pf.ref_idx[i] == pf.tgt_idx[i]]

        def over_gallery(query):
            logits = torch.tensor([cos(query, pf.gallery[j]) / tau for j in keep])
            return -(logits.log_softmax(0)[keep.index(int(pf.tgt_idx[i]))]).item()
        assert v["query"][i].item() == pytest.approx(over_gallery(q), abs=1e-4)
        assert v["text"][i].item() == pytest.approx(
            -((S[:, i] - hub[:, 0]).log_softmax(0)[k]).item(), abs=1e-4)
        change = F.normalize(t - F.normalize(r, dim=0), dim=0)
        logits = torch.tensor([cos(pf.f_txt[j], change) for j in range(U)]) / (tau * temp)
        assert v["change"][i].item() == pytest.approx(-logits.log_softmax(0)[k].item(), abs=1e-4)
    chunked = loss_text_nce(pf.f_txt, pf.f_ref, pf.gallery[pf.tgt_idx], pf.text_idx, tau * temp,
                            chunk=7)
    assert torch.allclose(chunked, v["text"], atol=1e-5)
    with pytest.raises(ValueError, match="unknown view 'nope'"):
        nfb.pair_views(pf, ["nope"], tau)

def test_text_view_finds_the_wrong_texts():
    """A hand-made sum-fusion world: target = reference + the edit's text vector. Pairs given
    another pair's text are the ones whose own text no longer explains (reference, target): the text
    view ranks them first."""
    g = torch.Generator().manual_seed(1)
    D, n = 64, 60
    edits = torch.randn(12, D, generator=g)                        # 12 distinct texts
    refs = 3 * torch.randn(n, D, generator=g)                      # far-apart references
    text_idx = torch.arange(n) % 12
    targets = refs + edits[text_idx]
    swapped = text_idx.clone()
    swapped[:5] = (text_idx[:5] + 1) % 12                          # 5 wrong texts on true pairs
    gallery = F.normalize(torch.cat([refs, targets]), dim=-1)
    pf = nfb.PairFeatures(f_txt=edits, text_idx=swapped, f_ref=refs, gallery=gallery,
                          tgt_idx=torch.arange(n) + n, ref_idx=torch.arange(n))
    v = nfb.pair_views(pf, ["query", "text"], 0.05)
    assert set(v["text"].argsort(descending=True)[:5].tolist()) == set(range(5))

def test_decide_views_gate_first_view_decides_whether_there_is_noise():
    """The query view's gate (both tests) says whether there is noise at all; the text view then
    joins when its noisy component is the wider, and a pair is flagged when any view flags it. A
    text view with a wide second mode never opens the gate on clean query losses (early in training
    it can have one)."""
    g = torch.Generator().manual_seed(0)
    clean = torch.distributions.Gamma(2.0, 1.0).sample((6000,))
    wide = lambda k: 9 + 10 * torch.rand(k, generator=g)       # noise: a mode far out and wide
    noisy_q = torch.cat([clean[:4800], wide(1200)])            # the query view: the last 1200 noisy
    text = torch.cat([clean[:4000], wide(2000)])               # the text view: 4000-5999
    w, per = nfb.decide_views(dict(query=noisy_q, text=text), ["query", "text"], gate=0.02)
    assert (w[:4000] >= 0.5).float().mean() > 0.93 and (w[4000:] < 0.5).float().mean() > 0.97
    assert not per["query"].mode["gated"] and not per["text"].mode["gated"]
    w_q, _ = nfb.decide_views(dict(query=noisy_q, text=text), ["query"], gate=0.02)
    assert (w_q[4000:4800] >= 0.5).float().mean() > 0.93            # only the text view flags these
    w, per = nfb.decide_views(dict(query=clean, text=text), ["query", "text"], gate=0.02)
    assert (w == 1).all() and per["query"].mode["gated"] and per["text"].mode["gated"]
    assert nfb.is_noise(per["text"].mode, 0.02)            # it would open the gate on its own
    nf = NoiseFilter(6000, warmup_epochs=0, gate=0.02, views=("query", "text"))
    stats = nf.update(dict(query=noisy_q, text=text, change=clean), 0)
    assert (nf.weights == w_q.minimum(nfb.decide_views(dict(query=noisy_q, text=text),
                                                       ["query", "text"], gate=0.02)[0])).all()
    # logged, not decided on
    assert stats["view_change_n_noisy"] >= 0 and "view_text_excess" in stats
    with pytest.raises(ValueError, match="needs the views"):
        nf.update(dict(query=noisy_q), 1)

# ==================================================================================================
# loss.py
# ==================================================================================================

def _qt(B=8, n_targets=None, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(n_targets or B, D, generator=g), dim=-1).requires_grad_()
    return q, t

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
    assert per.shape == (8,)
    assert torch.allclose(per, info_nce(q, t, tau, reduction="none"), atol=1e-6)

def test_soft_label_complement_is_rcl_on_the_non_matches_by_hand():
    """complement: w_i l_i + (1 - w_i) sum_{j != pos_i} -log(1 - p_ij), against a loop; w = 1 is
    InfoNCE; w = 0 hardly pulls a positive its query is far from."""
    tau, B, M = 0.1, 6, 10
    q, t = _qt(B, M)
    pos = torch.tensor([3, 0, 9, 1, 5, 5])
    w = torch.rand(B, generator=torch.Generator().manual_seed(3))
    p = (q @ t.T / tau).softmax(1)
    ref = torch.stack([w[i] * -p[i, pos[i]].log()
                       + (1 - w[i]) * sum(-torch.log(1 - p[i, j]) for j in range(M) if j != pos[i])
                       for i in range(B)])
    out = soft_nce(q, t, w, tau, pos=pos, soft="complement", reduction="none")
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(soft_nce(q, t, torch.ones(B), tau, pos=pos, soft="complement",
                                   reduction="none"),
                          info_nce(q, t, tau, pos=pos, reduction="none"), atol=1e-6)
    # a wrong positive, far from its query (p_pos ~ 0.016): l_i pulls its logit up with force
    # 1 - p_pos, the complement hardly at all (p_pos * sum_j p_ij / (1 - p_ij))
    logits = torch.tensor([[0.0, 3.0, 3.0, 3.0]], requires_grad=True)
    pulls = {}
    for form, w0 in (("complement", 0.0), ("weight", 1.0)):
        loss = soft_nce(logits, torch.eye(4), torch.tensor([w0]), 1.0, pos=torch.tensor([0]),
                        soft=form)
        pulls[form] = -torch.autograd.grad(loss, logits)[0][0, 0].item()
    assert pulls["weight"] > 0.98 and 0 < pulls["complement"] < 0.03

def test_soft_label_weight_is_w_times_cross_entropy_everywhere():
    tau, B, M = 0.1, 6, 10
    q, t = _qt(B, M)
    pos = torch.tensor([3, 0, 9, 1, 5, 5])
    w = torch.rand(B, generator=torch.Generator().manual_seed(2))
    ref = w * F.cross_entropy(q @ t.T / tau, pos, reduction="none")
    assert torch.allclose(soft_nce(q, t, w, tau, pos=pos, reduction="none", soft="weight"), ref,
                          atol=1e-5)
    with pytest.raises(ValueError, match="soft must be one of"):
        soft_nce(q, t, w, tau, pos=pos, soft="drop")

def test_nce_over_a_bank_hand_computed():
    """SPN stage 2's L_bank: info_nce / soft_nce with the bank as the candidates and pos its target
    rows. q0 = (1, 0), q1 = (0, 1); bank rows (1, 0), (0, 1), (-1, 0); tau = 0.5"""
    # logits: q0 -> [2, 0, -2], q1 -> [0, 2, 0]; targets 0 and 1
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    idx = torch.tensor([0, 1])
    # loss0 = log(1 + e^-2 + e^-4) = 0.1429316...; loss1 = log(1 + 2 e^-2) = 0.2395448...
    hard = info_nce(q, bank, 0.5, pos=idx, reduction="none")
    assert torch.allclose(hard, torch.tensor([0.14293163, 0.23954477]), atol=1e-6)
    # soft, w = (0.5, 1): loss0 = -0.5 log p00 = 0.5 * 0.1429316; loss1 unchanged
    soft = soft_nce(q, bank, torch.tensor([0.5, 1.0]), 0.5, pos=idx, soft="weight",
                    reduction="none")
    assert torch.allclose(soft, torch.tensor([0.07146582, 0.23954477]), atol=1e-6)
    assert torch.allclose(info_nce(q, bank, 0.5, pos=idx), hard.mean())

def test_gallery_nce_is_cross_entropy_with_the_reference_removed():
    q, g = _qt(12, 30)
    tgt = torch.randint(0, 30, (12,), generator=torch.Generator().manual_seed(3))
    ref = (tgt + 1) % 30
    ref[0] = tgt[0]                                              # a self-pair keeps its target
    logits = q @ g.T / 0.05
    logits[torch.arange(1, 12), ref[1:]] = float("-inf")
    want = F.cross_entropy(logits, tgt, reduction="none")
    assert torch.allclose(gallery_nce(q, g, tgt, 0.05, exclude=ref, chunk=5), want, atol=1e-5)
    assert torch.allclose(audit.score_triplets(q, g, tgt, ref, 0.05, chunk=7)["loss"], want,
                          atol=1e-5)

def test_losses_under_autocast_are_fp32_and_close():
    q, t = _qt(16, D=32)
    w = torch.rand(16)
    ref = [info_nce(q, t, 0.01), soft_nce(q, t, w, 0.01),
           soft_nce(q, t, w, 0.01, pos=torch.arange(16))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qb, tb = (q @ torch.eye(32)), (t @ torch.eye(32))   # bf16 activations, as from the model
        assert qb.dtype == torch.bfloat16
        out = [info_nce(qb, tb, 0.01), soft_nce(qb, tb, w, 0.01),
               soft_nce(qb, tb, w, 0.01, pos=torch.arange(16))]
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

# ==================================================================================================
# triplets.py (the triplet format, noise, missing images, extra triplets)
# ==================================================================================================

# ---- triplets.Triplets: your own triplets --------------------------------------------------------

def _own_triplets(tmp, rows, name="train.jsonl"):
    """A folder of the triplet format: the rows as JSON lines (or CSV), a tiny PNG under every image
    path they name."""
    png = _tiny_png(tmp)
    names = {r[k] for r in rows for k in ("reference", "target") if r.get(k)}
    for n in names | {m for r in rows for m in r.get("subset") or ()}:
        if not (tmp / n).exists():
            _link(png, tmp / n)
    if name.endswith(".csv"):
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines = [",".join(keys)] + [",".join("|".join(v) if isinstance(v, list) else str(v)
                                             for v in (r.get(k, "") for k in keys)) for r in rows]
        (tmp / name).write_text("\n".join(lines) + "\n")
    else:
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp

def test_triplet_format_reads_its_rows(tmp_path, capsys):
    """Rows in, triplets out: images relative to the folder (any depth), the gallery in order of
    first use, subsets, ids, known noise (true: a replaced target; or the field), other keys kept; a
    repeated row kept once and a row whose reference is its target kept, both counted; CSV reads the
    same."""
    rows = [dict(reference="a/1.png", text="make it red", target="b/2.png",
                 subset=["b/2.png", "c/3.png"], id="q1", source="crowd"),
            dict(reference="c/3.png", text=" remove the dog ", target="a/1.png", noisy=True),
            dict(reference="b/2.png", text="same", target="b/2.png", noisy="text"),
            dict(reference="a/1.png", text="make it red", target="b/2.png",
                 subset=["b/2.png", "c/3.png"], id="q9")]
    root = _own_triplets(tmp_path / "own", rows)
    ds = triplets.Triplets(root, "train")
    out = capsys.readouterr().out
    assert "3 triplets (1 with reference = target) over 3 images; 1 repeated rows kept once" in out
    assert ds.images == ["a/1.png", "b/2.png", "c/3.png"]
    assert ds.paths["c/3.png"] == root / "c/3.png"
    assert [(t["reference"], t["text"], t["target"]) for t in ds.triplets] == [
        ("a/1.png", "make it red", "b/2.png"), ("c/3.png", "remove the dog", "a/1.png"),
        ("b/2.png", "same", "b/2.png")]
    assert [t["pairid"] for t in ds.triplets] == ["q1", 2, 3]
    assert ds.triplets[0]["row"] == dict(source="crowd")
    assert ds.triplets[0]["members"] == ["b/2.png", "c/3.png"] and ds.triplets[1]["members"] is None
    assert ds.noise_field.tolist() == [0, 3, 2] and ds.noisy.tolist() == [False, True, True]
    assert ds[1] == (2, "remove the dog", 0, 1) and (ds.n_self_pairs, ds.n_repeated) == (1, 1)
    assert triplets.as_row(ds.triplets[0]) == dict(reference="a/1.png", text="make it red",
                                                   target="b/2.png", subset=["b/2.png", "c/3.png"],
                                                   id="q1", source="crowd")
    csv_root = _own_triplets(tmp_path / "csv", rows[:3], name="val.csv")
    val = triplets.Triplets(csv_root, "val")
    assert [t["text"] for t in val.triplets] == [t["text"] for t in ds.triplets]
    assert val.triplets[0]["members"] == ["b/2.png", "c/3.png"]
    assert val.noise_field.tolist() == [0, 3, 2]

def test_triplet_format_bad_rows_are_one_line_naming_file_row_and_key(tmp_path):
    good = dict(reference="a.png", text="make it red", target="b.png")
    cases = [
        ({**good, "target": None}, "row 2: no 'target'"),
        ({k: v for k, v in good.items() if k != "text"}, "row 2: no 'text'"),
        ({**good, "text": "  "}, "row 2: an empty 'text'"),
        ({**good, "reference": "gone.png"}, "row 2, key 'reference': gone.png does not exist"),
        ({**good, "subset": "a.png|c.png"},
         "row 2, key 'subset': the subset does not hold the target b.png"),
        ({**good, "noisy": "maybe"}, "row 2, key 'noisy': 'maybe'"),
    ]
    for k, (bad, expect) in enumerate(cases):
        root = _own_triplets(tmp_path / str(k),
                             [good, {**good, "reference": "c.png", "target": "a.png"}])
        (root / "val.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            triplets.Triplets(root, "val")
        msg = str(e.value)
        assert msg.startswith(str(root / "val.jsonl")), (bad, msg)
        assert expect in msg and "\n" not in msg, (bad, msg)
    root = _own_triplets(tmp_path / "more", [good])
    (root / "train.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"train.jsonl row 2: not a JSON object"):
        triplets.Triplets(root, "train")
    with pytest.raises(FileNotFoundError, match="no val.jsonl or val.csv in"):
        triplets.Triplets(root, "val")
    (root / "train.jsonl").write_text(json.dumps({**good, "reference": "gone.png"}) + "\n"
                                      + json.dumps(good) + "\n")
    # the triplet that uses it is dropped
    kept = triplets.Triplets(root, "train", skip_missing=True)
    assert [t["reference"] for t in kept.triplets] == ["a.png"]

# ---- noise injection -----------------------------------------------------------------------------

def _trips(n=200, m=50):
    return [dict(reference=f"i{k % m}", target=f"i{(k * 7 + 1) % m}", text="t") for k in range(n)]

def test_inject_noise():
    trips = _trips()
    images = [f"i{k}" for k in range(50)]
    for p in (0.1, 0.25, 0.5, 0.8, 1.0):
        new, flags = triplets.inject_noise(trips, images, triplets.Noise(p, "target", 3))
        assert int(flags.sum()) == round(p * 200) and flags.dtype == torch.bool
        for t, t0, f in zip(new, trips, flags):
            assert (t["target"] != t0["target"]) == bool(f) and t["reference"] == t0["reference"]
            if f:
                assert t["target"] in images and t["target"] != t0["reference"]
        new2, flags2 = triplets.inject_noise(trips, images, triplets.Noise(p, "target", 3))
        assert new2 == new and torch.equal(flags, flags2)
    assert (triplets.inject_noise(trips, images, triplets.Noise(0.5, "target", 4))[0]
            != triplets.inject_noise(trips, images, triplets.Noise(0.5, "target", 3))[0])
    assert trips == _trips()  # input untouched
    same, flags = triplets.inject_noise(trips, images, triplets.Noise(0.0, "shuffle", 1))
    assert all(a is b for a, b in zip(same, trips)) and len(same) == 200 and not flags.any()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        triplets.inject_noise(trips, images, triplets.Noise(1.5))

def _changed(new, old):
    return [tuple(f for f in ("reference", "text", "target") if a[f] != b[f])
            for a, b in zip(new, old)]

@pytest.mark.parametrize("p", [0.2, 0.5, 0.8, 1.0])
def test_shuffle_noise_permutes_three_fields_in_three_parts(tmp_path, p):
    """TME's protocol on real CIRR rows: the chosen triplets in three equal parts, references /
    texts / targets permuted within a part. Every field keeps its multiset; a triplet changes in at
    most one field; a triplet whose value the permutation left equal (CIRR references repeat) is
    clean."""
    rows = make_cirr_train(tmp_path, 300)
    ds = data.CIRR(tmp_path, "train")
    noisy = data.CIRR(tmp_path, "train", noise=triplets.Noise(p, "shuffle", 7))
    old, new = ds.triplets, noisy.triplets
    for f in ("reference", "text", "target"):
        assert sorted(t[f] for t in new) == sorted(t[f] for t in old)
    changed = _changed(new, old)
    assert all(len(c) <= 1 for c in changed)
    assert [bool(c) for c in changed] == noisy.noisy.tolist()
    k = round(p * len(rows))
    per_field = {f: sum(c == (f,) for c in changed) for f in ("reference", "text", "target")}
    assert all(v <= -(-k // 3) for v in per_field.values())        # one third of the chosen at most
    assert k - 30 <= int(noisy.noisy.sum()) <= k             # fixed points and equal values are few
    assert all(t["captions"] == [t["text"]] for t in new)    # the text moves with its caption
    again = data.CIRR(tmp_path, "train", noise=triplets.Noise(p, "shuffle", 7))
    assert again.triplets == new and torch.equal(again.noisy, noisy.noisy)

def test_partial_text_and_target_noise(tmp_path):
    make_cirr_train(tmp_path, 300)
    ds = data.CIRR(tmp_path, "train")
    partial = data.CIRR(tmp_path, "train", noise=triplets.Noise(0.4, "partial", 1))
    assert int(partial.noisy.sum()) == 120
    for t, t0, f in zip(partial.triplets, ds.triplets, partial.noisy):
        assert _changed([t], [t0])[0] == (("target",) if f else ())
        if f:        # a near miss: another image of the query's own subset, never its reference
            assert t["target"] in t0["members"] and t["target"] != t0["reference"]
    text = data.CIRR(tmp_path, "train", noise=triplets.Noise(0.4, "text", 1))
    assert int(text.noisy.sum()) == 120
    texts = {t["text"] for t in ds.triplets}
    for t, t0, f in zip(text.triplets, ds.triplets, text.noisy):
        assert _changed([t], [t0])[0] == (("text",) if f else ()) and t["text"] in texts
    target = data.CIRR(tmp_path, "train", noise=triplets.Noise(0.4, "target", 1))
    assert all(_changed([t], [t0])[0] == (("target",) if f else ())
               for t, t0, f in zip(target.triplets, ds.triplets, target.noisy))

def test_fashioniq_noise_kinds(tmp_path):
    """FashionIQ: shuffle moves the caption pair as one text; it has no subsets, so partial is
    refused."""
    root = make_fiq(tmp_path, "train", ("dress",))
    ds = data.FashionIQ(root, "dress", "train")
    n = data.FashionIQ(root, "dress", "train", noise=triplets.Noise(0.3, "shuffle", 0))
    pairs = {tuple(t["captions"]): t["text"] for t in ds.triplets}
    assert all(pairs[tuple(t["captions"])] == t["text"] for t in n.triplets)
    assert 0 < int(n.noisy.sum()) <= round(0.3 * len(ds))
    with pytest.raises(ValueError, match="partial.*has none"):
        data.FashionIQ(root, "dress", "train", noise=triplets.Noise(0.3, "partial", 0))
    with pytest.raises(ValueError, match="noise-kind"):
        triplets.check_noise(triplets.Noise(0.3, "swap"))

# ---- missing and corrupt images, extra triplets --------------------------------------------------

def test_missing_images_error_and_skip(tmp_path, capsys):
    rows = json.loads((CIRR_ANN / "captions/cap.rc2.val.json").read_text())
    n_img = len(json.loads((CIRR_ANN / "image_splits/split.rc2.val.json").read_text()))
    gone = sorted({rows[0]["reference"], rows[10]["target_hard"],
                   rows[20]["img_set"]["members"][0]})
    root = make_cirr(tmp_path, ("val",), drop=gone)
    with pytest.raises(FileNotFoundError) as e:
        data.CIRR(root, "val")
    msg = str(e.value)
    assert f"3 of {n_img} images are missing" in msg
    assert "skip_missing=True" in msg and "--skip-missing" in msg
    assert gone[0] in msg and str(root / "img_raw" / "dev" / f"{gone[0]}.png") in msg
    capsys.readouterr()
    ds = data.CIRR(root, "val", skip_missing=True)
    out = capsys.readouterr().out
    # evaluation needs whole subsets: a query goes when its reference, target or any member is
    # missing
    expect = [r for r in rows
              if not {r["reference"], r["target_hard"], *r["img_set"]["members"]} & set(gone)]
    assert len(ds) == len(expect)
    assert [t["pairid"] for t in ds.triplets] == [r["pairid"] for r in expect]
    assert f"{len(rows) - len(expect)} of {len(rows)} triplets dropped" in out
    assert "3 missing images dropped" in out
    assert len(ds.images) == n_img - 3 and not set(gone) & set(ds.images)

def test_missing_fashioniq_skip(tmp_path, capsys):
    rows = json.loads((FIQ_ANN / "captions/cap.shirt.val.json").read_text())
    n_img = len(json.loads((FIQ_ANN / "image_splits/split.shirt.val.json").read_text()))
    gone = sorted({rows[i]["candidate"] for i in range(0, len(rows), 7)} | {rows[5]["target"]})
    root = make_fiq(tmp_path, "val", ("shirt",), drop=gone)
    with pytest.raises(FileNotFoundError, match=f"{len(gone)} of {n_img} images are missing"):
        data.FashionIQ(root, "shirt", "val")
    ds = data.FashionIQ(root, "shirt", "val", skip_missing=True)
    expect = [r for r in rows if r["candidate"] not in gone and r["target"] not in gone]
    assert 0 < len(ds) == len(expect) < len(rows) and len(ds.images) == n_img - len(gone)
    assert f"{len(rows) - len(expect)} of {len(rows)} triplets dropped" in capsys.readouterr().out

def test_corrupt_image_names_path(tmp_path):
    root = make_cirr(tmp_path, ("val",))
    ds = data.CIRR(root, "val")
    p = ds.paths[ds.images[3]]
    p.unlink()  # a hard link: replace it, do not write through it
    p.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    images = ImageSource.files(ds, None)
    images.load([2])
    with pytest.raises(OSError, match=re.escape(str(p))):
        images.load([3])

def test_extra_triplets(toy_root, tmp_path):
    extra = [dict(reference="train-0-1", target="train-1-2",
                  text="a large red circle instead of a square")]
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    ds = data.CIRR(toy_root, "train", noise=triplets.Noise(0.5),
                   extra_triplets=tmp_path / "extra.json")
    assert len(ds) == 161 and ds.triplets[-1]["text"] == extra[0]["text"] and not ds.noisy[-1]
    assert ds[160] == (ds.index["train-0-1"], extra[0]["text"], ds.index["train-1-2"], 160)
    with pytest.raises(ValueError, match="training images"):
        data.CIRR(toy_root, "train",
                  extra_triplets=[dict(reference="nope", target="train-1-2", text="x")])

# ==================================================================================================
# data.py (CIRR, FashionIQ, Shoes)
# ==================================================================================================

# ---- the excerpts of the real annotation files (testdata/) ---------------------------------------

# what cut_excerpts keeps of each file: the first rows, and the split entries those rows name
# plus a few more
EXCERPT_ROWS = {"cirr": {"val": 300, "test1": 100}, "fashioniq": 100,
                "shoes": {"train": 400, "test": 200}}
EXCERPT_UNUSED = 20          # split entries that no kept row names: gallery images no query uses
# entries of split.rc2.train.json (its captions are not in the release copy)
EXCERPT_CIRR_TRAIN = 300

def cut_excerpts(full, out):
    """The excerpts under testdata/, cut from the full annotation files in `full` (cirr/,
    fashioniq/, shoes/) into `out`, each in its file's own JSON style. CIRR: the first rows of val
    and test1, the split entries their references, targets and img_set members name (split order)
    and EXCERPT_UNUSED more, the first entries of the train split. FashionIQ: per category and
    split, the first rows and the split names they use plus EXCERPT_UNUSED more. Shoes: the first
    rows with both images in train, in test, and every row whose reference is its target, in file
    order; the names they use plus EXCERPT_UNUSED more of each split file."""
    read = lambda *p: json.loads(Path(full, *p).read_text())

    def write(obj, *p, indent=None):
        path = Path(out, *p)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=indent))

    def keep(names, used):                   # names in file order: the used ones, then a few unused
        unused = [n for n in names if n not in used][:EXCERPT_UNUSED]
        return [n for n in names if n in used or n in unused]

    for split, n in EXCERPT_ROWS["cirr"].items():
        rows = read("cirr/captions", f"cap.rc2.{split}.json")[:n]
        used = {m for r in rows for m in (r["reference"], r.get("target_hard"),
                                          *r.get("target_soft", {}), *r["img_set"]["members"])}
        paths = read("cirr/image_splits", f"split.rc2.{split}.json")
        write(rows, "cirr/captions", f"cap.rc2.{split}.json")
        write({k: paths[k] for k in keep(list(paths), used)}, "cirr/image_splits",
              f"split.rc2.{split}.json")
    train = read("cirr/image_splits/split.rc2.train.json")
    write(dict(list(train.items())[:EXCERPT_CIRR_TRAIN]), "cirr/image_splits/split.rc2.train.json")
    for c in data.FIQ_CATEGORIES:
        for split in data.FIQ_SPLITS:
            rows = read("fashioniq/captions", f"cap.{c}.{split}.json")[:EXCERPT_ROWS["fashioniq"]]
            used = {m for r in rows for m in (r["candidate"], r.get("target"))}
            names = read("fashioniq/image_splits", f"split.{c}.{split}.json")
            write(rows, "fashioniq/captions", f"cap.{c}.{split}.json", indent=4)
            write(keep(names, used), "fashioniq/image_splits", f"split.{c}.{split}.json", indent=4)
    rows = read("shoes", data.SHOES_CAPTIONS)
    names = {s: Path(full, "shoes", f).read_text().split()
             for s, f in data.SHOES_SPLIT_FILES.items()}
    kept = set()
    for s, n in EXCERPT_ROWS["shoes"].items():
        both = [i for i, r in enumerate(rows)
                if {r["ReferenceImageName"], r["ImageName"]} <= set(names[s])]
        kept |= set(both[:n])
    kept |= {i for i, r in enumerate(rows) if r["ReferenceImageName"] == r["ImageName"]}
    rows = [rows[i] for i in sorted(kept)]
    write(rows, "shoes", data.SHOES_CAPTIONS)
    used = {m for r in rows for m in (r["ReferenceImageName"], r["ImageName"])}
    for s, f in data.SHOES_SPLIT_FILES.items():
        Path(out, "shoes", f).write_text("\n".join(keep(names[s], used)) + "\n")

@needs_full
def test_excerpts_are_cut_from_the_full_files(tmp_path):
    """testdata/ is what cut_excerpts makes of the full files, byte for byte: the excerpts are the
    real files' rows. To cut them again:
    python -c "import test_all as t; t.cut_excerpts('FULL', 'testdata')"."""
    cut_excerpts(FULL, tmp_path)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    kept = sorted(p.relative_to(EXCERPT) for p in EXCERPT.rglob("*")
                  if p.is_file() and p.suffix in (".json", ".txt"))
    assert made == kept and len(made) == 26
    for f in made:
        assert (tmp_path / f).read_bytes() == (EXCERPT / f).read_bytes(), f

# ---- CIRR ----------------------------------------------------------------------------------------

def test_cirr_val_real_counts(real_cirr, capsys):
    cirr_root, src = real_cirr
    trip = data.CIRR(cirr_root, "val")
    assert "CIRR release layout (img_raw/)" in capsys.readouterr().out
    rows = json.loads((src / "captions/cap.rc2.val.json").read_text())
    split = list(json.loads((src / "image_splits/split.rc2.val.json").read_text()))
    if is_full(src):                                            # the release's counts
        assert (len(rows), len(split)) == (4181, 2297)
    assert len(trip) == len(trip.triplets) == len(rows)
    assert trip.images == split and trip.index == {n: j for j, n in enumerate(split)}
    for t, r in zip(trip.triplets, rows):
        assert t["reference"] in t["members"] and t["target"] in t["members"]
        assert len(set(t["members"])) == 6
        assert t["text"] == r["caption"] and t["target"] == r["target_hard"]
        assert t["pairid"] == r["pairid"]
        for n in t["members"]:
            assert trip.paths[n].is_file()
    assert not trip.noisy.any() and trip.noisy.shape == (len(rows),)
    with pytest.raises(ValueError, match="training split"):
        data.CIRR(cirr_root, "val", noise=triplets.Noise(0.1))
    ref, text, tgt, i = trip[7]                          # the one item shape: indices and text
    t = trip.triplets[7]
    assert (trip.images[ref], text, trip.images[tgt], i) == (
        t["reference"], t["text"], t["target"], 7)
    im = ImageSource.files(trip, None).load([5])         # images by index, through the image source
    assert im.shape == (1, 3, 4, 4) and im.dtype == torch.float32

def test_cirr_test1_real_counts(real_cirr):
    cirr_root, src = real_cirr
    trip = data.CIRR(cirr_root, "test1")
    rows = json.loads((src / "captions/cap.rc2.test1.json").read_text())
    split = json.loads((src / "image_splits/split.rc2.test1.json").read_text())
    if is_full(src):                                            # the release's counts
        assert (len(rows), len(split)) == (4148, 2315)
    assert len(trip) == len(rows) and len(trip.images) == len(split)
    assert all(t["target"] is None for t in trip.triplets) and (trip.tgt_idx == -1).all()
    assert all(t["reference"] in t["members"] for t in trip.triplets)
    ref, text, tgt, i = trip[3]                                   # no target: -1
    assert tgt == -1 and trip.images[ref] in trip.triplets[3]["members"] and i == 3

@pytest.mark.parametrize("ann_sub,img_sub,label", [("", "img_raw", "CIRR release layout"),
                                                   ("cirr", "", "CLIP4Cir layout"),
                                                   ("", "", "flat layout"),
                                                   ("cirr", "cirr/img_raw", "custom layout")])
def test_cirr_layout_variants(tmp_path, capsys, ann_sub, img_sub, label):
    root = make_cirr(tmp_path, ("val",), ann_sub, img_sub)
    ds = data.CIRR(root, "val")
    out = capsys.readouterr().out
    assert label in out and len(out.strip().splitlines()) == 1
    assert ds.images == list(json.loads((CIRR_ANN / "image_splits/split.rc2.val.json").read_text()))
    assert all(p.is_file() for p in ds.paths.values())

def test_cirr_says_its_layout_once_per_process(cirr_root, capsys):
    """The layout line is printed by the first dataset of a split, not by every copy of it."""
    data.CIRR(cirr_root, "val")
    data.CIRR(cirr_root, "val")
    data.CIRR(cirr_root, "val")
    data.CIRR(cirr_root, "test1")
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"CIRR val: CIRR release layout (img_raw/): annotations {cirr_root}, images "
                     f"{cirr_root / 'img_raw'}", lines[1]] and lines[1].startswith("CIRR test1: ")
    util._SAID.clear()                              # what a new process remembers: nothing
    data.CIRR(cirr_root, "val")
    assert capsys.readouterr().out.splitlines() == lines[:1]

def test_cirr_train_split_nested_folders(tmp_path):
    rows = make_cirr_train(tmp_path)
    ds = data.CIRR(tmp_path, "train")
    ref, text, tgt, i = ds[11]
    assert (ds.images[ref], text, ds.images[tgt], i) == (rows[11]["reference"], rows[11]["caption"],
                                                         rows[11]["target_hard"], 11)
    images = ImageSource.files(ds, lambda im: torch.zeros(3, 8, 8))   # read in the loader's workers
    collate = functools.partial(train.collate, images=images)
    batch = next(iter(DataLoader(ds, batch_size=5, collate_fn=collate)))
    assert batch[1].shape == batch[2].shape == (5, 3, 8, 8) and list(batch[3]) == [0, 1, 2, 3, 4]
    noisy = data.CIRR(tmp_path, "train", noise=triplets.Noise(0.3, "target", 5))
    assert int(noisy.noisy.sum()) == 90
    for t, t0, f in zip(noisy.triplets, ds.triplets, noisy.noisy):
        assert (t["target"] != t0["target"]) == bool(f)
    assert (noisy.tgt_idx == torch.tensor([noisy.index[t["target"]] for t in noisy.triplets])).all()

# ---- FashionIQ -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ann", ANNOTATIONS)
def test_fashioniq_val_real_counts(ann, tmp_path, capsys):
    src = ann / "fashioniq"
    fiq_root = make_fiq(tmp_path, src=src)
    rows = {c: json.loads((src / f"captions/cap.{c}.val.json").read_text()) for c in CATS}
    split = {c: json.loads((src / f"image_splits/split.{c}.val.json").read_text()) for c in CATS}
    counts = {c: (len(rows[c]), len(split[c])) for c in CATS}
    if is_full(src):                                            # the release's counts
        assert counts == {"dress": (2017, 3817), "shirt": (2038, 6346), "toptee": (1961, 5373)}
    for c, (nt, ni) in counts.items():
        trip = data.FashionIQ(fiq_root, (c,), "val")
        assert len(trip) == nt and len(trip.images) == ni
        # every candidate and target is in the category's own val split (checked on the real files)
        assert trip.images == split[c]
        assert all(t["reference"] in trip.index and t["target"] in trip.index
                   for t in trip.triplets)
        assert all(t["category"] == c and t["members"] is None for t in trip.triplets)
        assert all(p.is_file() and p.suffix == ".png" for p in trip.paths.values())
    assert "(.png)" in capsys.readouterr().out
    both = data.FashionIQ(fiq_root, CATS, "val")
    assert len(both) == sum(nt for nt, _ in counts.values())
    # images of two categories are kept once
    shared = len(set(split["shirt"]) & set(split["toptee"]))
    assert len(both.images) == len(set().union(*split.values())) == sum(
        ni for _, ni in counts.values()) - shared
    assert shared == 121 if is_full(src) else shared >= 0
    assert {c: len(v) for c, v in both.category_images.items()} == {
        c: v[1] for c, v in counts.items()}

def test_fashioniq_text(fiq_root):
    ds = data.FashionIQ(fiq_root, ("dress",), "val")
    rows = json.loads((FIQ_ANN / "captions/cap.dress.val.json").read_text())
    c0, c1 = (c.strip(".?, ") for c in rows[0]["captions"])
    assert ds.triplets[0]["text"] == f"{c0} and {c1}" and ds[0][1] == ds[0][1] == f"{c0} and {c1}"
    assert ds.triplets[0]["captions"] == rows[0]["captions"]
    assert data.fiq_text(["is red.", " has dots, "]) == "is red and has dots"
    assert data.fiq_text(["", "is grey"]) == "is grey"  # an empty caption (3 in val) is left out
    # training: both orders or either caption alone, governed by the torch RNG
    tr = data.FashionIQ(fiq_root, ("dress",), "val", random_text=True)
    torch.manual_seed(0)
    seen = {tr[0][1] for _ in range(200)}
    assert seen == {f"{c0} and {c1}", f"{c1} and {c0}", c0, c1}
    torch.manual_seed(0)
    a = [tr[0][1] for _ in range(20)]
    torch.manual_seed(0)
    assert a == [tr[0][1] for _ in range(20)]

def test_fashioniq_test_split_and_jpg_subfolder(tmp_path, capsys):
    root = make_fiq(tmp_path, "test", ("dress",), ".jpg", ann_sub="fashionIQ_dataset")
    ds = data.FashionIQ(root, "dress", "test")
    assert "(.jpg)" in capsys.readouterr().out
    rows, split = (json.loads((FIQ_ANN / f).read_text())
                   for f in ("captions/cap.dress.test.json", "image_splits/split.dress.test.json"))
    assert len(ds) == len(rows) and ds.images == split
    assert all(t["target"] is None for t in ds.triplets)
    assert all(p.suffix == ".jpg" and p.is_file() for p in ds.paths.values())
    assert (ds.tgt_idx == -1).all()
    assert ds[0][2] == -1

def test_fashioniq_train_items(tmp_path):
    root = make_fiq(tmp_path, "train", ("dress",))
    ds = data.FashionIQ(root, "dress", "train")
    ref, text, tgt, i = ds[3]
    t = ds.triplets[3]
    assert (ds.images[ref], ds.images[tgt], i) == (t["reference"], t["target"], 3)
    assert isinstance(text, str)
    assert ImageSource.files(ds, None).load([ref, tgt]).shape == (2, 3, 4, 4)
    n = data.FashionIQ(root, "dress", "train", noise=triplets.Noise(0.2, "target", 1))
    rows = json.loads((FIQ_ANN / "captions/cap.dress.train.json").read_text())
    assert int(n.noisy.sum()) == round(0.2 * len(rows))

# ---- Shoes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ann", ANNOTATIONS)
def test_shoes_real_counts(ann, tmp_path, capsys):
    """The release (full files): 8,990 train and 1,761 test triplets (both images in the split: a
    plain filter of the real file here), 27 self-pairs (26 + 1), no exact repeat, every name a file;
    the excerpt: the same filter."""
    src = ann / "shoes"
    shoes_root = make_shoes(tmp_path, rows=_shoes_rows(src),
                            names={s: _shoes_names(s, src) for s in data.SHOES_SPLITS})
    rows = _shoes_rows(src)
    keys = [(r["ReferenceImageName"], r["ImageName"], r["RelativeCaption"]) for r in rows]
    assert len(set(keys)) == len(rows) == (10751 if is_full(src) else len(rows))
    assert not set(_shoes_names("train", src)) & set(_shoes_names("test", src))
    for split in data.SHOES_SPLITS:
        names = _shoes_names(split, src)
        in_split = set(names)
        both = [(i, r) for i, r in enumerate(rows) if set(_pair(r)) <= in_split]
        n_self = sum(a == b for a, b in (_pair(r) for _, r in both))
        n_trip, n_img = len(both), len(names)
        if is_full(src):                                        # the release's counts
            assert (n_trip, n_img, n_self) == {"train": (8990, 10000, 26),
                                               "test": (1761, 4658, 1)}[split]
        trip = data.Shoes(shoes_root, split)
        out = capsys.readouterr().out
        assert "Attribute Discovery layout (womens_<category>/<0|1>/)" in out
        assert f"{n_trip} triplets ({n_self} with reference = target) over {n_img} images" in out
        assert len(trip) == n_trip and len(trip.images) == n_img and n_self >= 1
        assert trip.images == names
        assert [(t["pairid"], t["reference"], t["target"], t["text"]) for t in trip.triplets] == [
            (i, *_pair(r), r["RelativeCaption"].strip()) for i, r in both]
        assert trip.n_self_pairs == n_self
        for n, p in trip.paths.items():  # found by name, in its category's womens_<category>/<0|1>/
            assert p.name == n and p.is_file() and n.startswith("img_" + p.parent.parent.name + "_")
        assert all(t["members"] is None and t["category"] is None for t in trip.triplets)
    t = trip.triplets[0]
    ref, text, tgt, i = data.Shoes(shoes_root, "test")[0]
    assert (trip.images[ref], text, trip.images[tgt], i) == (
        t["reference"], t["text"], t["target"], 0)
    assert ImageSource.files(trip, None).load([2]).shape == (1, 3, 4, 4)

def test_shoes_repeated_rows_kept_once(tmp_path, capsys):
    rows = _shoes_rows()
    test = set(_shoes_names("test"))
    first = next(i for i, r in enumerate(rows) if r["ImageName"] in test)
    root = make_shoes(tmp_path, ("test",), rows=rows + [rows[first], rows[0], rows[first]])
    ds = data.Shoes(root, "test")
    out = capsys.readouterr().out
    assert len(ds) == len(_shoes_triplets("test"))
    assert "3 repeated rows of relative_captions_shoes.json kept once" in out
    pairids = [t["pairid"] for t in ds.triplets]
    assert pairids.count(first) == 1 and max(pairids) < len(rows)     # the first copy is kept

@pytest.mark.parametrize("top,ann_sub,flat,label", [
    ("", "", False, "Attribute Discovery layout (womens_<category>/<0|1>/)"),
    ("attributedata", "dataset", False, "Attribute Discovery layout under attributedata/ (womens_"),
    ("images", "", True, "flat layout (images in images/)"),
    ("", "dataset", True, "flat layout (images in the root)")])
def test_shoes_layout_variants(tmp_path, capsys, monkeypatch, top, ann_sub, flat, label):
    """The archive with and without a top folder such as attributedata/, flat copies, annotations
    in the root or in dataset/. Images are found by one listing per folder: no stat per image."""
    root = make_shoes(tmp_path, ("test",), top, ann_sub, flat)
    stats, real_stat = [], os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: stats.append(a[0]) or real_stat(*a, **k))
    gal = data.Shoes(root, "test")
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert label in out and f"annotations {tmp_path / ann_sub}".rstrip("/") in out
    assert len(out.splitlines()) == 1 and len(stats) < 10, stats
    assert gal.images == _shoes_names("test")
    assert all(p.is_file() and p.name == n for n, p in gal.paths.items())

def test_shoes_missing_images(tmp_path, capsys):
    rows, n_img = _shoes_triplets("test"), len(_shoes_names("test"))
    used = {n for r in rows for n in _pair(r)}
    unused = next(n for n in _shoes_names("test") if n not in used)
    gone = {rows[0]["ReferenceImageName"], rows[9]["ImageName"], unused}
    root = make_shoes(tmp_path, ("test",), drop=gone)
    with pytest.raises(FileNotFoundError) as e:
        data.Shoes(root, "test")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and f"3 of {n_img} images named in" in msg
    assert "eval_im_names.txt" in msg and all(n in msg for n in gone) and "--skip-missing" in msg
    capsys.readouterr()
    ds = data.Shoes(root, "test", skip_missing=True)
    out = capsys.readouterr().out
    expect = [_pair(r) for r in rows if not set(_pair(r)) & gone]
    assert [(t["reference"], t["target"]) for t in ds.triplets] == expect
    assert f"{len(rows) - len(expect)} of {len(rows)} triplets dropped" in out
    assert "3 missing images dropped" in out
    assert len(ds.images) == n_img - 3 and not gone & set(ds.images)
    # no image at all: a wrong root, whatever skip_missing says
    bare = make_shoes(tmp_path / "bare", ())
    with pytest.raises(FileNotFoundError, match=f"none of the {n_img} images of eval_im_names.txt"):
        data.Shoes(bare, "test", skip_missing=True)

def test_shoes_bad_root_one_line(tmp_path, micro_clip, capsys):
    with pytest.raises(FileNotFoundError) as e:
        data.Shoes(tmp_path / "nowhere", "test")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert "relative_captions_shoes.json" in msg and "--data-root" in msg
    root = make_shoes(tmp_path / "r", ())
    (root / "eval_im_names.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"eval_im_names.txt not found.*beside"):
        data.Shoes(root, "test")
    with pytest.raises(ValueError, match="no val split.*test"):
        data.Shoes(root, "val")
    (root / "relative_captions_shoes.json").write_text('{"ImageName": "a.jpg"}')
    with pytest.raises(ValueError, match="relative_captions_shoes.json: expected a JSON list"):
        data.Shoes(root, "train")
    (root / "train_im_names.txt").write_text("\n")
    with pytest.raises(ValueError, match="train_im_names.txt names no image"):
        data.Shoes(root, "train")
    with pytest.raises(SystemExit):              # no folder: runtime.settings stops first, one line
        train.main(["--dataset", "shoes", "--data-root", str(tmp_path / "nowhere"),
                    "--clip", str(micro_clip)])
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --data-root {tmp_path / 'nowhere'}: no such folder; point it at the shoes dataset "
        "folder"]
    (tmp_path / "empty").mkdir()
    # a folder without the files: train.py prints one line
    with pytest.raises(FileNotFoundError) as e:
        train.main(["--dataset", "shoes", "--data-root", str(tmp_path / "empty"),
                    "--clip", str(micro_clip), "--out", str(tmp_path / "run")])
    assert len(util.error_line(e.value).splitlines()) == 1
    assert "relative_captions_shoes.json" in str(e.value)

def test_shoes_noise_kinds_and_partial_refused(shoes_root, tmp_path, capsys):
    """--noise works on Shoes; it has no subsets, so --noise-kind partial is one clear line before
    anything loads."""
    ds = data.Shoes(shoes_root, "train")
    n = data.Shoes(shoes_root, "train", noise=triplets.Noise(0.3, "shuffle", 0))
    for f in ("reference", "text", "target"):
        assert sorted(t[f] for t in n.triplets) == sorted(t[f] for t in ds.triplets)
    assert [bool(c) for c in _changed(n.triplets, ds.triplets)] == n.noisy.tolist()
    assert 0.9 * round(0.3 * len(ds)) < int(n.noisy.sum()) <= round(0.3 * len(ds))
    target = data.Shoes(shoes_root, "train", noise=triplets.Noise(0.2, "target", 1))
    assert int(target.noisy.sum()) == round(0.2 * len(ds)) == round(
        0.2 * len(_shoes_triplets("train")))
    with pytest.raises(ValueError, match="partial.*has none"):
        data.Shoes(shoes_root, "train", noise=triplets.Noise(0.3, "partial", 0))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:            # runtime.settings: before any data or model
        runtime.settings(["--dataset", "shoes", "--noise", "0.2", "--noise-kind", "partial",
                        "--data-root", str(tmp_path)])     # an empty folder: nothing to load
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: --noise-kind partial"), err

# ---- a wrong root --------------------------------------------------------------------------------

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

# ---- data.dataset (the dataset a run's settings name) and data.convert ---------------------------

def test_dataset_of_a_runs_settings(toy_root, fiq_root, shoes_root):
    """data.dataset: the dataset the settings name, the injected noise on the training triplets
    only."""
    s = SimpleNamespace(dataset="toy", data_root=toy_root, categories=CATS, skip_missing=False,
                        noise=0.2, noise_kind="text", seed=1, extra_triplets=None)
    train_set = data.dataset(s, "train")
    want = data.CIRR(toy_root, "train", noise=triplets.Noise(0.2, "text", 1))
    assert train_set.triplets == want.triplets and torch.equal(train_set.noisy, want.noisy)
    assert train_set[0] == want[0] and train_set.images == want.images
    # evaluation splits carry no noise
    val = data.dataset(s, "val")
    assert val.triplets == data.CIRR(toy_root, "val").triplets
    s.dataset, s.data_root, s.categories = "fashioniq", fiq_root, ("dress", "shirt")
    fiq = data.dataset(s, "val")
    want = data.FashionIQ(fiq_root, ("dress", "shirt"), "val")
    assert fiq.triplets == want.triplets
    s.dataset, s.data_root = "shoes", shoes_root
    assert data.dataset(s, "test").images == _shoes_names("test")

def test_converted_excerpts_equal_the_loaders_triplets(tmp_path, cirr_root, fiq_root, shoes_root):
    """python data.py convert: CIRR, FashionIQ and Shoes excerpts in the triplet format read back as
    the original loaders' triplets (images by path), subsets and FashionIQ's categories included."""
    cases = [("cirr", cirr_root, "val", "val"), ("fashioniq", fiq_root, "val", "val"),
             ("shoes", shoes_root, "test", "val")]
    for dataset, root, split, name in cases:
        s = SimpleNamespace(dataset=dataset, data_root=root, categories=list(CATS),
                            skip_missing=False, noise=0.0, noise_kind="shuffle", seed=0,
                            extra_triplets=None, train_file=None)
        want = data.dataset(s, split)
        out = tmp_path / dataset
        written = data.convert(s, out, splits=(split,))     # the excerpts' val (Shoes: test) splits
        got = triplets.Triplets(out, name)
        path = lambda n: str((out / n).resolve())
        assert [(path(t["reference"]), t["text"], path(t["target"])) for t in got.triplets] == [
            (str(want.paths[t["reference"]].resolve()), t["text"],
             str(want.paths[t["target"]].resolve())) for t in want.triplets], dataset
        assert written[name] == len(want)
        if dataset == "cirr":
            assert [[path(m) for m in t["members"]] for t in got.triplets] == [
                [str(want.paths[m].resolve()) for m in t["members"]] for t in want.triplets]
        if dataset == "fashioniq":
            assert [t["category"] for t in got.triplets] == [t["category"] for t in want.triplets]

# ==================================================================================================
# toy.py (the toy benchmark)
# ==================================================================================================

COL = "|".join(toy.TOY_COLORS)
SH = "circle|square|triangle"
CELL = "|".join(toy.TOY_CELLS)
REF = re.compile(rf"^(?:(?P<size>small|large) )?(?:(?P<color>{COL}) )?(?P<shape>{SH})"
                 rf"(?: at the (?P<cell>{CELL}))?$")
EDITS = [  # an independent parser of the grammar in data.py's docstring
    ("color", re.compile(rf"^(?:make|paint) the (?P<ref>.+) (?P<color>{COL})$")),
    ("size", re.compile(r"^make the (?P<ref>.+) (?P<dir>bigger|smaller)$")),
    ("size", re.compile(r"^(?P<dir>enlarge|shrink) the (?P<ref>.+)$")),
    ("shape", re.compile(rf"^(?:turn the (?P<ref>.+) into|make the (?P<ref2>.+)) "
                         rf"a (?P<shape>{SH})$")),
    ("add", re.compile(rf"^(?:add|put) a (?P<size>small|large) (?P<color>{COL}) (?P<shape>{SH}) "
                       rf"at the (?P<cell>{CELL})$")),
    ("remove", re.compile(r"^(?:remove|take away) the (?P<ref>.+)$")),
    ("move", re.compile(rf"^(?:move|shift) the (?P<ref>.+) to the (?P<cell>{CELL})$")),
]

def apply_edit(scene, text):
    """Apply a modification text to a scene (list of {shape, color, size, cell}); asserts the
    reference is unique."""
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

def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}

def test_toy_deterministic(toy_root, tmp_path):
    again = toy.make_toy(tmp_path / "a", **TOY)
    assert _files(again) == _files(toy_root)
    assert _files(toy.make_toy(tmp_path / "b", **{**TOY, "seed": 8})) != _files(toy_root)
    # a fresh interpreter with another string-hash seed writes the same bytes (no set-order
    # dependence)
    code = f"import toy; toy.make_toy({str(tmp_path / 'c')!r}, **{TOY!r})"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(toy.__file__).parent,
                   env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert _files(tmp_path / "c") == _files(toy_root)

def test_toy_captions_describe_the_change(toy_root):
    scenes = json.loads((toy_root / "scenes.json").read_text())
    answers = json.loads((toy_root / "toy_test1_targets.json").read_text())
    for split in ("train", "val", "test1"):
        for r in json.loads((toy_root / f"captions/cap.rc2.{split}.json").read_text()):
            tgt = r.get("target_clean", r.get("target_hard", answers.get(str(r["pairid"]))))
            assert apply_edit(scenes[r["reference"]], r["caption"]) == scenes[tgt], r
    captions = json.loads((toy_root / "image_captions.json").read_text())
    for n, s in scenes.items():  # the exact caption of every scene
        assert captions[n] == " and ".join(
            f"a {o['size']} {o['color']} {o['shape']} at the {o['cell']}" for o in s)
        assert 1 <= len(s) <= 3 and len({o["cell"] for o in s}) == len(s)

def test_toy_structure(toy_root):
    scenes = json.loads((toy_root / "scenes.json").read_text())
    key = lambda n: json.dumps(scenes[n], sort_keys=True)
    queries, images = {}, {}
    for split in ("train", "val", "test1"):
        rows = json.loads((toy_root / f"captions/cap.rc2.{split}.json").read_text())
        split_file = json.loads((toy_root / f"image_splits/split.rc2.{split}.json").read_text())
        assert len(rows) == TOY[{"train": "n_train", "val": "n_val", "test1": "n_test"}[split]]
        assert len(split_file) == TOY_IMAGES[split]
        queries[split] = {(key(r["reference"]), r["caption"]) for r in rows}
        images[split] = {key(n) for n in split_file}
        for r in rows:
            m = r["img_set"]["members"]
            assert len(m) == 6 and len(set(m)) == 6
            assert r["reference"] in m and set(m) <= set(split_file)
            if split != "test1":
                assert r.get("target_clean", r["target_hard"]) in m
                assert m[r["img_set"]["target_rank"]] == r.get("target_clean", r["target_hard"])
            else:
                assert "target_hard" not in r
        for rel in split_file.values():
            with Image.open(toy_root / rel) as im:
                assert im.size == (TOY["image_size"],) * 2 and im.mode == "RGB"
    assert not queries["val"] & queries["train"] and not queries["test1"] & queries["train"]
    assert not queries["val"] & queries["test1"]
    assert not images["val"] & images["train"] and not images["test1"] & images["train"]

def test_toy_noise_and_cirr_loader(toy_root, capsys):
    rows = json.loads((toy_root / "captions/cap.rc2.train.json").read_text())
    flags = [r["noisy"] for r in rows]
    assert sum(flags) == round(0.25 * 160)
    assert all((r["target_hard"] != r.get("target_clean", r["target_hard"])) == f
               for r, f in zip(rows, flags))
    ds = data.CIRR(toy_root, "train")
    assert "flat layout" in capsys.readouterr().out
    assert ds.noisy.tolist() == flags and len(ds) == 160 and len(ds.images) == 32 * 6
    ref, text, tgt, i = ds[0]
    assert (ds.images[ref], text, ds.images[tgt]) == (rows[0]["reference"], rows[0]["caption"],
                                                      rows[0]["target_hard"])
    assert ImageSource.files(ds, None).load([ref]).shape == (1, 3, 32, 32)
    both = data.CIRR(toy_root, "train", noise=triplets.Noise(0.5, "shuffle", 2))
    _, injected = triplets.inject_noise(ds.triplets, ds.images, triplets.Noise(0.5, "shuffle", 2))
    assert torch.equal(both.noisy, ds.noisy | injected)
    val = data.CIRR(toy_root, "val")
    assert len(val) == 40 and len(val.images) == 8 * 6
    assert all(t["target"] in t["members"] for t in val.triplets)
    assert len(data.CIRR(toy_root, "test1").images) == 48

def test_ensure_toy(tmp_path, capsys):
    root = tmp_path / "toy"
    # its own small sets: it generates three
    SIZES = dict(TOY, seed=1, n_train=20, n_val=10, n_test=10)
    toy.ensure_toy(root, **SIZES)
    assert "generating" in capsys.readouterr().out
    stamp = (root / "scenes.json").stat().st_mtime_ns
    assert toy.ensure_toy(root, **SIZES) == root and "generating" not in capsys.readouterr().out
    assert (root / "scenes.json").stat().st_mtime_ns == stamp
    toy.ensure_toy(root, **{**SIZES, "seed": 2})  # other parameters: regenerated in place
    assert json.loads((root / "toy_params.json").read_text())["seed"] == 2
    assert not list(tmp_path.glob(".toy.tmp-*"))
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        toy.ensure_toy(other, **SIZES)
    assert toy.default_toy_root().name == "toy"

def test_toy_edit_type_matches_the_scene_change(toy_root):
    scenes = json.loads((toy_root / "scenes.json").read_text())
    key = lambda o: (o["shape"], o["color"], o["size"], o["cell"])

    def change(ref, tgt):                   # independent truth: what differs between the two scenes
        a, b = {key(o) for o in scenes[ref]}, {key(o) for o in scenes[tgt]}
        if len(b) != len(a):
            return "add" if len(b) > len(a) else "remove"
        (old,), (new,) = a - b, b - a
        first = next(i for i in range(4) if old[i] != new[i])
        return {0: "shape", 1: "color", 2: "size", 3: "move"}[first]
    seen = set()
    for split in ("train", "val"):
        for r in json.loads((toy_root / "captions" / f"cap.rc2.{split}.json").read_text()):
            tgt = r.get("target_clean", r["target_hard"])
            assert toy.edit_type(r["caption"]) == change(r["reference"], tgt), r
            seen.add(toy.edit_type(r["caption"]))
    assert seen == {"add", "remove", "move", "color", "size", "shape"}
    with pytest.raises(ValueError, match="not a toy modification text"):
        toy.edit_type("make it nicer")

# ==================================================================================================
# encode.py (Encoder, ImageSource)
# ==================================================================================================

# ---- features sharded over processes -------------------------------------------------------------

def _sharded_encodings(state, root, rank=0, world=1, bank_path=None):
    """What an Encoder of rank `rank` of `world` computes with the micro model `state` on the
    toy: validation metrics and features, SPN's token cache and bank of the training images.
    Batches of 4 cut every rank's share where one process cuts its whole set (24 of 48 val
    images, 20 of 40 queries, 96 of 192 training images)."""
    model = CIRModel(CLIP(**MICRO))
    model.load_state_dict(state)
    enc = Encoder(model, batch_size=4, workers=0, rank=rank, world=world)
    transform = TK.make_transform("clip", MICRO["image_resolution"])
    s = SimpleNamespace(dataset="toy", data_root=root, categories=None, skip_missing=False)
    feats = {}
    sets = [(name, ImageSource.files(ds, transform), ds)
            for name, ds in evaluate.eval_sets(s, "val")]
    metrics = evaluate.evaluate_sets(enc, sets, "toy", feats)
    train_set = data.CIRR(root, "train")
    files = ImageSource.files(train_set, transform)
    tokens = ImageSource.tokens(train_set, enc, files).cache
    spn_side = ImageSource.features(train_set, enc, files, bank_path)
    f_ref, bank = spn_side.cache, spn_side.bank
    q, g = feats["toy"]
    return dict(metrics=metrics, q=q, g=g, tokens=tokens, f_ref=f_ref, bank=bank)

def _sharded_worker(rank, world, port, state, root, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    res = _sharded_encodings(state, root, rank, world, out / f"bank{rank}.pt")
    # runtime's helpers on shares that do not split evenly: rows 0-3 on rank 0, 4-6 on rank 1
    mine = torch.tensor_split(torch.arange(21.0).view(7, 3), world)[rank]
    res["rows"] = runtime.gather_rows(mine, 7)
    torch.save(res, out / f"rank{rank}.pt")
    dist.destroy_process_group()

@pytest.fixture(scope="module")
def sharded(toy_root, tmp_path_factory):
    """One micro model (WCB heads on) encoding the toy in two gloo processes, each its share, and
    in this one. Returns (this process's results, each rank's results, the folder of the banks)."""
    import torch.multiprocessing as mp
    torch.manual_seed(2)
    model = CIRModel(CLIP(**MICRO))
    with torch.no_grad():                      # non-zero α: the WCB heads change the features
        for head in (model.wcb_txt, model.wcb_ref, model.wcb_tar):
            head.alpha.fill_(0.5)
    state = model.state_dict()
    out = tmp_path_factory.mktemp("sharded")
    ctx, port = mp.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_sharded_worker, args=(r, 2, port, state, toy_root, out))
             for r in range(2)]
    for p in procs:
        p.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                  # as the workers: the same kernels, the same last bits
    try:
        one = _sharded_encodings(state, toy_root, bank_path=out / "bank.pt")
    finally:
        torch.set_num_threads(threads)
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    return one, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)], out

def test_e2e_validation_sharded_over_two_processes_matches_one(sharded):
    """Encoder under DDP: each rank encodes its share of the val images and queries, the
    rows are gathered in order, and every rank's metrics are one process's."""
    one, ranks, _ = sharded
    d = MICRO["embed_dim"]
    assert one["q"].shape == (40, d) and one["g"].shape == (TOY_IMAGES["val"], d)
    for r in ranks:
        assert r["metrics"] == one["metrics"]
        assert torch.allclose(r["q"], one["q"], atol=1e-6)
        assert torch.allclose(r["g"], one["g"], atol=1e-6)

def test_e2e_token_cache_and_bank_sharded_over_two_processes_match_one(sharded):
    """ImageSource.tokens and ImageSource.features (SPN's bank) under DDP: every rank holds every
    training image's tokens, f_ref and bank row, as one process computes them; rank 0 alone writes
    bank.pt."""
    one, ranks, out = sharded
    n, m = TOY_IMAGES["train"], (MICRO["image_resolution"] // MICRO["vision_patch_size"]) ** 2
    assert one["tokens"].shape == (n, 1 + m, MICRO["embed_dim"])
    assert one["tokens"].dtype == torch.float16
    assert torch.allclose(one["bank"].norm(dim=-1), torch.ones(n))
    for r in ranks:
        assert torch.allclose(r["tokens"].float(), one["tokens"].float(), atol=1e-3)
        assert torch.allclose(r["f_ref"], one["f_ref"], atol=1e-6)
        assert torch.allclose(r["bank"], one["bank"], atol=1e-6)
    saved = torch.load(out / "bank0.pt", weights_only=True)
    assert torch.allclose(saved["bank"], one["bank"], atol=1e-6) and not (out / "bank1.pt").exists()

# ==================================================================================================
# evaluate.py (metrics, submission files)
# ==================================================================================================

# ---- metrics, hand-made cases and a plain loop ---------------------------------------------------

def _onehot(*rows):
    return torch.tensor(rows, dtype=torch.float)

def test_cirr_reference_removed_before_ranking():
    # the query is closest to its own reference (im0); removing it makes the target (im1) rank first
    g = _onehot([1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1])
    q = _onehot([1, 0, 0])
    names = ["im0", "im1", "im2", "im3"]
    m = cirr_metrics(q, g, names, ["im0"], ["im1"], [["im0", "im1", "im2", "im3"]])
    assert m["R@1"] == 100.0 and m["Rsubset@1"] == 100.0
    # without removal the same target would sit at rank 2: the metric must not see the reference
    m = cirr_metrics(q, g, names, ["im3"], ["im1"], [["im3", "im1", "im2", "im0"]])
    assert m["R@1"] == 0.0 and m["R@5"] == 100.0

def test_cirr_subset_ranking():
    # full ranking: im4, im3, im2(target), ...; the subset {ref im0, im2, im1, im5} minus the
    # reference ranks the target first, since im4 and im3 are outside the subset
    g = _onehot([0, 0, 0, 1], [0.9, 0.2, 0, 0], [0, 0.7, 0.3, 0], [0, 0.8, 0.2, 0], [0, 1, 0, 0],
                [0.9, 0.1, 0, 0])
    q = _onehot([0, 1, 0, 0])
    names = [f"im{i}" for i in range(6)]
    m = cirr_metrics(q, g, names, ["im0"], ["im2"], [["im0", "im2", "im1", "im5"]])
    assert (m["R@1"], m["R@5"], m["Rsubset@1"]) == (0.0, 100.0, 100.0)
    top50, top3 = cirr_rankings(q, g, names, ["im0"], [["im0", "im2", "im1", "im5"]])
    assert top50[0][:3] == ["im4", "im3", "im2"] and "im0" not in top50[0]
    assert top3 == [["im2", "im1", "im5"]]

def test_ties_keep_gallery_order():
    g = _onehot([1, 0], [1, 0], [0, 1])           # im0 and im1 tie
    q = _onehot([1, 0], [1, 0])
    names = ["im0", "im1", "im2"]
    m = fashioniq_metrics(q, g, names, ["im0", "im1"])  # im0 ranks 1st, im1 2nd
    assert m["R@10"] == 100.0
    assert evaluate.topk(q, g, 2).tolist() == [[0, 1], [0, 1]]
    assert cirr_metrics(q[:1], g, names, ["im2"], ["im1"], [["im2", "im1", "im0"]])["R@1"] == 0.0
    assert cirr_metrics(q[:1], g, names, ["im2"], ["im0"], [["im2", "im1", "im0"]])["R@1"] == 100.0

def _loop_metrics(q, g, names, refs, tgts, members):
    """The protocol written as plainly as possible: sort, drop the reference, find the target."""
    s = F.normalize(q, dim=-1) @ F.normalize(g, dim=-1).T
    ranks, sub_ranks = [], []
    for i in range(len(q)):
        order = sorted(range(len(names)), key=lambda j: (-s[i, j].item(), j))
        ranked = [names[j] for j in order if names[j] != refs[i]]
        ranks.append(ranked.index(tgts[i]))
        sub_ranks.append([n for n in ranked if n in members[i]].index(tgts[i]))
    out = {f"R@{k}": 100 * sum(r < k for r in ranks) / len(q) for k in (1, 5, 10, 50)}
    out.update({f"Rsubset@{k}": 100 * sum(r < k for r in sub_ranks) / len(q) for k in (1, 2, 3)})
    return out

@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_against_loop(seed):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    G, Q, D = 80, 50, 6
    g, q = torch.randn(G, D), torch.randn(Q, D)
    g[7] = g[3]                                   # an exact tie
    names = [f"im{i}" for i in range(G)]
    refs, tgts, members = [], [], []
    for _ in range(Q):
        m = rng.sample(range(G), 6)
        refs.append(names[m[0]])
        tgts.append(names[m[rng.randint(1, 5)]])
        members.append([names[j] for j in m])
    ours = cirr_metrics(q, g, names, refs, tgts, members, chunk=7)
    ref = _loop_metrics(q, g, names, refs, tgts, members)
    assert ours == pytest.approx(ref, abs=1e-9)
    fiq = fashioniq_metrics(q, g, names, tgts, chunk=9)
    loop = _loop_metrics(q, g, names, ["none"] * Q, tgts, members)
    assert fiq == pytest.approx({"R@10": loop["R@10"], "R@50": loop["R@50"]}, abs=1e-9)
    # your own triplets: subsets of different sizes (2 to 6 images), and none at all (no
    # Recall_subset)
    ragged = [m[:rng.randint(2, 6)] for m in members]
    ragged = [m if tgt in m else m + [tgt] for m, tgt in zip(ragged, tgts)]
    assert cirr_metrics(q, g, names, refs, tgts, ragged, chunk=7) == pytest.approx(
        _loop_metrics(q, g, names, refs, tgts, ragged), abs=1e-9)
    plain = cirr_metrics(q, g, names, refs, tgts, None, chunk=7)
    assert plain == pytest.approx({k: v for k, v in ref.items() if k.startswith("R@")}, abs=1e-9)

def test_shoes_metrics_hand_made():
    g = _onehot([1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1])
    names = ["im0", "im1", "im2", "im3"]
    # q0: nearest to its reference im0; removing it puts the target im1 first
    # q1: a self-pair (reference = target = im1): a miss at every K, even with 4 images and K = 50
    # q2: im3 first, then im1 and im2 tie at 0 and gallery order puts the target im2 third
    q = _onehot([1, 0, 0], [1, 0, 0], [0, 0, 1])
    m = evaluate.shoes_metrics(q, g, names, ["im0", "im1", "im0"], ["im1", "im1", "im2"])
    assert m == pytest.approx({"R@1": 100 / 3, "R@10": 200 / 3, "R@50": 200 / 3})
    # with im0 kept in the ranking (another reference), q0's target is second
    assert evaluate.shoes_metrics(q[:1], g, names, ["im3"], ["im1"])["R@1"] == 0.0

def _shoes_loop(q, g, names, refs, tgts):
    """The protocol as plainly as possible: sort (ties by gallery order), drop the reference, look
    for the target in the top K; a self-pair's target went with its reference."""
    s = (F.normalize(q, dim=-1) @ F.normalize(g, dim=-1).T).numpy()
    index = {n: j for j, n in enumerate(names)}
    hits = {1: 0, 10: 0, 50: 0}
    for i in range(len(q)):
        order = np.argsort(-s[i], kind="stable")
        ranked = order[order != index[refs[i]]]
        for k in hits:
            hits[k] += index[tgts[i]] in ranked[:k]
    return {f"R@{k}": 100 * h / len(q) for k, h in hits.items()}

@pytest.mark.parametrize("seed", [0, 1])
def test_shoes_metrics_against_loop(seed):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    G, Q, D = 90, 70, 6
    g, q = torch.randn(G, D), torch.randn(Q, D)
    g[7] = g[3]                                                       # an exact tie
    names = [f"im{i}" for i in range(G)]
    refs = [rng.choice(names) for _ in range(Q)]
    tgts = [r if i % 9 == 0 else rng.choice(names) for i, r in enumerate(refs)]  # self-pairs
    ours = evaluate.shoes_metrics(q, g, names, refs, tgts, chunk=8)
    assert ours == pytest.approx(_shoes_loop(q, g, names, refs, tgts), abs=1e-9)

@pytest.mark.parametrize("ann", ANNOTATIONS)
def test_shoes_metrics_real_test_split_against_loop(ann):
    """The real test split (the release: 1,761 queries, one self-pair, over the 4,658 eval images),
    random features with half of the queries near their target."""
    torch.manual_seed(0)
    names = _shoes_names("test", ann / "shoes")
    index = {n: j for j, n in enumerate(names)}
    rows = _shoes_triplets("test", ann / "shoes")
    assert any(a == b for a, b in map(_pair, rows))
    refs, tgts = [r["ReferenceImageName"] for r in rows], [r["ImageName"] for r in rows]
    g, q = torch.randn(len(names), 4), torch.randn(len(rows), 4)
    half = len(rows) // 2
    q[:half] = g[[index[t] for t in tgts[:half]]] + 0.3 * q[:half]
    ours = evaluate.shoes_metrics(q, g, names, refs, tgts)
    assert ours == pytest.approx(_shoes_loop(q, g, names, refs, tgts), abs=1e-9)
    assert ours["R@50"] > 30

# ---- submission files ----------------------------------------------------------------------------

def test_submission_files_and_checker(tmp_path):
    names = [f"test1-{i}" for i in range(60)]
    torch.manual_seed(0)
    g, q = torch.randn(60, 8), torch.randn(3, 8)
    refs = ["test1-0", "test1-1", "test1-2"]
    members = [[r] + names[10 + 5 * i:15 + 5 * i] for i, r in enumerate(refs)]
    top50, top3 = cirr_rankings(q, g, names, refs, members)
    paths = write_submission(tmp_path, [11, 12, 13], top50, top3)
    for p, metric, k in zip(paths, ("recall", "recall_subset"), (50, 3)):
        check_submission(p, [11, 12, 13], refs, metric, k)
        sub = json.loads(p.read_text())
        assert sub["version"] == "rc2" and sub["metric"] == metric and len(sub["11"]) == k
    sub = json.loads(paths[0].read_text())
    assert all(r not in sub[str(p)] for p, r in zip([11, 12, 13], refs))
    assert set(json.loads(paths[1].read_text())["12"]) <= set(members[1])
    # the checker catches broken files
    for breakage, msg in ((lambda s: s.pop("12"), "pairid 12 missing"),
                          (lambda s: s.__setitem__("11", s["11"][:49]), "needs 50"),
                          (lambda s: s.__setitem__("11", ["test1-0"] + s["11"][1:]),
                           "own reference"),
                          (lambda s: s.__setitem__("version", "rc1"), "version")):
        broken = dict(sub)
        breakage(broken)
        paths[0].write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=msg):
            check_submission(paths[0], [11, 12, 13], refs, "recall", 50)

# ==================================================================================================
# search.py (query your own images)
# ==================================================================================================

def test_search_counts_are_checked_before_any_model(tmp_path, capsys):
    """--top and --show below 1: one line naming both, before a model is loaded."""
    for flags in (["--top", "0"], ["--show", "0"]):
        with pytest.raises(SystemExit) as e:
            search.main(["--query", "x.png", "--text", "t", "--gallery", str(tmp_path), *flags])
        assert e.value.code == 2
        assert capsys.readouterr().err.startswith("error: --top ")

def test_e2e_query_your_own_images(toy_root, micro_clip, tmp_path, capsys, monkeypatch):
    """search.py --query IMAGE --text TEXT --gallery DIR, zero-shot: one line per hit, best first,
    the path last; the query image, which is in the gallery, is not returned; the gallery's features
    are computed once and read back while the folder and the model are unchanged; a picture;
    --queries scores the targets it is given. Bad input is one line before any model is loaded."""
    gallery = toy_root / "dev"
    ref = sorted(gallery.glob("*.png"))[0]
    args = ["--clip", str(micro_clip), "--gallery", str(gallery), "--workers", "0", "--top", "4",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "q.png")]
    res = search.main(["--query", str(ref), "--text", "make the circle red", *args])
    printed = capsys.readouterr().out.splitlines()
    hits = [line.split() for line in printed if line.startswith("  ")]
    assert len(hits) == 4 and [int(h[0]) for h in hits] == [1, 2, 3, 4]
    assert all(Path(h[-1]).is_file() and Path(h[-1]) != ref for h in hits)
    assert [float(h[1]) for h in hits] == sorted((float(h[1]) for h in hits), reverse=True)
    assert "computed and kept in" in printed[0] and (tmp_path / "q.png").is_file()
    cache = list((tmp_path / "cache").glob("*.pt"))
    assert len(cache) == 1 and len(res["names"]) == len(list(gallery.glob("*.png")))
    search.main(["--query", str(ref), "--text", "make the circle red", *args])
    assert "read from" in capsys.readouterr().out.splitlines()[0]
    # many queries at once: the toy's val triplets, their targets known
    rows = json.loads((toy_root / "captions/cap.rc2.val.json").read_text())[:6]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(dict(
        reference=os.path.relpath(gallery / f"{r['reference']}.png", tmp_path), text=r["caption"],
        target=os.path.relpath(gallery / f"{r['target_hard']}.png", tmp_path))) + "\n"
        for r in rows))
    res = search.main(["--queries", str(tmp_path / "queries.jsonl"), *args, "--show", "2"])
    assert res["queries"] == res["with_target"] == 6 and 0 <= res["hits"] <= 6
    printed = capsys.readouterr().out
    assert f"target within the top 4: {res['hits']} of 6" in printed
    shown = [line for line in printed.splitlines() if line.startswith("query ")]
    assert len(shown) == search.QUERIES_SHOWN
    written = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert written == res["results"] and len(written) == 6
    for r, row in zip(written, rows):         # paths normalised; the target's rank against the hits
        assert r["reference"] == str(gallery / f"{row['reference']}.png")
        assert ".." not in r["target"]
        found = [k for k, h in enumerate(r["hits"], 1) if h["path"] == r["target"]]
        assert found == ([r["target_rank"]] if r["target_rank"] <= 4 else [])
    with Image.open(tmp_path / "q.png") as im:                              # --show 2: two rows
        assert im.size[1] == 2 * 2.0 * 100
    # a gallery with an unreadable file: the query answers, names it, and does not cache it
    mixed = tmp_path / "mixed"
    shutil.copytree(gallery, mixed)
    (mixed / "broken.png").write_bytes(b"not a png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = search.main(["--query", str(ref), "--text", "make it red 🎈", *args[:3], str(mixed),
                           *args[4:]])
    assert not [w for w in caught if "Glyph" in str(w.message)]   # an emoji drawn without a warning
    printed = capsys.readouterr().out
    assert "1 unreadable file skipped: broken.png" in printed and res["skipped"] == ["broken.png"]
    assert str(mixed / "broken.png") not in {h["path"] for h in res["results"][0]["hits"]}
    cached = torch.load(next(p for p in (tmp_path / "cache").glob("*.pt") if p.stat().st_mtime_ns ==
                             max(q.stat().st_mtime_ns for q in (tmp_path / "cache").glob("*.pt"))),
                        weights_only=True)
    assert "broken.png" not in cached["names"] and cached["skipped"] == ["broken.png"]
    # bad input: one line, and no model loaded
    monkeypatch.setattr(runtime, "load_clip", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.png").write_text("not an image")
    for flags, expect in (
            (["--query", str(ref), "--text", "x", "--gallery", str(tmp_path / "empty")],
             "no image"),
            (["--query", str(ref), "--text", "x", "--gallery", str(tmp_path / "nowhere")],
             "no such folder"),
            (["--query", str(ref), "--gallery", str(gallery)], "--query needs --text"),
            (["--query", str(ref), "--text", " ", "--gallery", str(gallery)], "--text is empty"),
            (["--query", str(tmp_path / "notes.png"), "--text", "x", "--gallery", str(gallery)],
             "cannot read the query image")):
        with pytest.raises((SystemExit, OSError)) as e:
            search.main([*flags, "--clip", str(micro_clip)])
        assert expect in str(e.value) and "\n" not in str(e.value), (flags, str(e.value))

# ==================================================================================================
# audit.py
# ==================================================================================================

# ---- scores and order, hand-made -----------------------------------------------------------------

def test_audit_scores_and_order_hand_made():
    """score_triplets on 4 queries over 5 images, against a plain loop: the loss of the labelled
    target over the gallery without the reference (a self-pair keeps it), its rank and the best
    other images; then audit_rows on hand-set w and losses: ascending w, ties by descending loss,
    every field of a row in place."""
    g = F.normalize(torch.tensor([[1.0, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0.6, 0.8],
                                  [0, 0.1, 1]]), dim=-1)
    q = F.normalize(torch.tensor([[1.0, 0.3, 0], [0.1, 1, 0.2], [0.3, 0, 1], [0.5, 0.4, 0.25]]),
                    dim=-1)
    ref, tgt, tau = torch.tensor([0, 2, 4, 1]), torch.tensor([1, 3, 0, 1]), 0.1
    s = audit.score_triplets(q, g, tgt, ref, tau, k=3, chunk=3)
    for i in range(4):
        sims = [(q[i] @ g[j]).item() for j in range(5)]
        keep = [j for j in range(5) if j != ref[i] or ref[i] == tgt[i]]
        ranked = sorted(keep, key=lambda j: -sims[j])
        loss = math.log(sum(math.exp(sims[j] / tau) for j in keep)) - sims[tgt[i]] / tau
        assert s["loss"][i].item() == pytest.approx(loss, rel=1e-5, abs=1e-5)  # float32 log-softmax
        assert s["rank"][i].item() == ranked.index(tgt[i])
        assert s["top"][i].tolist() == [j for j in ranked if j != tgt[i]][:3]
    names = [f"im{j}" for j in range(5)]
    trips = SimpleNamespace(
        images=names, noisy=torch.tensor([False, True, False, False, True]),
        noise_field=torch.tensor([0, 3, 0, 0, 2]),
        triplets=[dict(pairid=10 + i, subset=i // 2, reference=names[i], text=f"edit {i}",
                       target=names[4 - i]) for i in range(5)])
    loss, text = torch.tensor([2.0, 5.0, 3.0, 1.0, 4.0]), torch.tensor([1.0, 1.5, 2.0, 9.0, 3.0])
    scores = dict(w=torch.tensor([0.9, 0.1, 0.9, 0.1, 0.5]), loss=loss,
                  rank=torch.tensor([0, 7, 1, 2, 3]),
                  top=torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2], [1, 2, 3]]),
                  views=dict(query=loss, text=text),
                  view_w=dict(query=torch.tensor([0.9, 0.1, 0.9, 0.8, 0.5]),
                              text=torch.tensor([1.0, 0.7, 0.9, 0.1, 0.6])))
    rows = audit.audit_rows(trips, scores, "cirr",
                            w_train=torch.tensor([1.0, 0.0, 1.0, 0.5, 0.25]))
    assert [r["index"] for r in rows] == [1, 3, 4, 2, 0]
    assert rows[0] == dict(index=1, pairid=11, subset=0, reference="im1", text="edit 1",
                           target="im3", w=pytest.approx(0.1), loss=5.0, rank=8,
                           top3=["im0", "im2", "im3"],
                           views=dict(query=dict(loss=5.0, w=pytest.approx(0.1)),
                                      text=dict(loss=1.5, w=pytest.approx(0.7))),
                           flagged_by=["query"], w_train=0.0, noise="target")
    # why each is suspect
    assert [r["flagged_by"] for r in rows] == [["query"], ["text"], [], [], []]
    assert [r["noise"] for r in rows] == ["target", "clean", "text", "clean", "clean"]
    s = audit.audit_summary(trips, scores, "shoes")                    # Shoes: totals, no breakdown
    assert (s["flagged"], s["noisy"], s["precision@2"], s["recall@5"]) == (2, 2, 0.5, 1.0)
    assert s["flagged_by_field"] == {"clean": pytest.approx(100 / 3), "text": 0.0, "target": 100.0}
    assert s["flagged_by_view"] == dict(query=1, text=1)
    assert s["view_flagged_by_field"]["text"] == {"clean": pytest.approx(100 / 3), "text": 0.0,
                                                  "target": 0.0}
    # noisy 5, 4 above every clean loss; 1.5, 3: 3 of 6
    assert s["view_auc"] == dict(query=1.0, text=0.5)

# ---- the audit of a trained run ------------------------------------------------------------------

@pytest.fixture(scope="module")
def audit_run(tmp_path_factory):
    """A trained run to audit: a clean toy of 480 triplets with 30% given a wrong target
    (--noise-kind target), 8 epochs of a micro CLIP with 8-px patches (it learns the toy in seconds;
    MICRO's 16-px patches do not), the NFB's labels weighting the loss from epoch 6; the audit of
    its last epoch. Returns (toy root, run folder, the audit's summary)."""
    # Not the shared toy_root: the injected noise must be the only noise (toy_root has its own),
    # and 160 triplets are too few for precision@k to say more than chance.
    tmp = tmp_path_factory.mktemp("audit")
    root = toy.make_toy(tmp / "toy", seed=5, noise=0.0, image_size=32, n_train=480, n_val=40,
                        n_test=40)
    torch.manual_seed(0)
    torch.save(CLIP(**dict(MICRO, vision_patch_size=8)).state_dict(), tmp / "clip.pt")
    out = train.main(["--dataset", "toy", "--data-root", str(root), "--clip", str(tmp / "clip.pt"),
                      "--out", str(tmp / "run"), "--epochs", "8", "--batch-size", "32",
                      "--workers", "0", "--lr", "2e-3", "--lr-wcb", "2e-3", "--noise", "0.3",
                      "--noise-kind", "target", "--no-wcb", "--soft-label", "weight",
                      "--warmup-epochs", "6"])
    return root, out, audit.main(["--checkpoint", str(out / "last.pt"), "--workers", "0"])

def _audit_rows(folder, name="audit"):
    return [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]

def test_e2e_audit_finds_the_injected_noise_of_a_trained_run(audit_run, capsys):
    """The run's own noise (its --noise, --noise-kind, --seed) is the truth: the most suspicious
    triplets are mostly the corrupted ones, far above the 30% of a random order."""
    root, out, s = audit_run
    rows = _audit_rows(out)
    noisy = [r["noise"] != "clean" for r in rows]
    k = sum(noisy)
    assert k == s["noisy"] == round(0.3 * 480) and s["random_precision"] == pytest.approx(0.3)
    assert s[f"precision@{k}"] == sum(noisy[:k]) / k and s["recall@100"] == sum(noisy[:100]) / k
    assert s[f"precision@{k}"] >= 0.6 and s["precision@100"] >= 0.6      # random: 0.3
    assert s["auc"] > 0.8 and s["auc_loss"] > 0.8
    assert s["flagged_by_field"]["target"] > 2 * s["flagged_by_field"]["clean"]
    assert sum(c["n"] for c in s["by"].values()) == 480
    assert set(s["by"]) <= {"color", "size", "shape", "add", "remove", "move"}
    audit.print_audit_summary(s, "toy train")
    printed = capsys.readouterr().out
    assert f"480 triplets, {s['flagged']} flagged" in printed and f"precision@{k} " in printed
    with Image.open(out / "audit.png") as im:       # 24 rows in two blocks: a page, not a strip
        assert max(im.size) <= 1400
    assert (out / "audit.png").stat().st_size < 1_000_000

def test_e2e_audit_rows_match_the_caption_file_and_the_checkpoint(audit_run):
    """Every row is a training triplet of the caption file (by pairid), its target replaced where
    the truth says so; rows are sorted by w; w is the GMM of the listed losses; w_train is the
    checkpoint's NFB labels; rank and top 3 follow a plain ranking of the model's features."""
    root, out, s = audit_run
    rows = _audit_rows(out)
    caps = {c["pairid"]: c for c in json.loads((root / "captions/cap.rc2.train.json").read_text())}
    assert sorted(r["pairid"] for r in rows) == sorted(caps)
    assert sorted(r["index"] for r in rows) == list(range(480))
    for r in rows:
        c = caps[r["pairid"]]
        assert (r["reference"], r["text"], r["subset"]) == (c["reference"], c["caption"],
                                                           c["img_set"]["id"])
        assert (r["target"] == c["target_hard"]) == (r["noise"] == "clean")
    for a, b in zip(rows, rows[1:]):
        assert a["w"] < b["w"] or (a["w"] == b["w"] and a["loss"] >= b["loss"])
    by_index = sorted(rows, key=lambda r: r["index"])
    # w: the NFB's decision on the listed views, with the run's settings (the query view, then
    # the text view)
    views = {k: torch.tensor([r["views"][k]["loss"] for r in by_index]) for k in ("query", "text")}
    assert [r["loss"] for r in by_index] == [r["views"]["query"]["loss"] for r in by_index]
    w, _ = nfb.decide_views(views, ["query", "text"], gate=0.02)
    assert w.tolist() == pytest.approx([r["w"] for r in by_index], abs=1e-6)
    assert all((r["w"] < 0.5) == bool(r["flagged_by"]) for r in rows)
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert [r["w_train"] for r in by_index] == pytest.approx(ckpt["nfb"]["weights"].tolist())
    assert s["flagged_train"] == int((ckpt["nfb"]["weights"] < 0.5).sum()) > 0
    # as the audit: its device and precision
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = runtime.build_model(ckpt).to(device).eval()
    trips = data.CIRR(root, "train", noise=triplets.Noise(0.3, "target", 0))
    gallery = trips
    enc = Encoder(model, 128, device, workers=0, amp=runtime.autocast("auto", device)[0])
    q, g = encode.query_features(enc, ImageSource.files(trips, TK.make_transform("clip", 32)),
                                 trips)
    q, g = q.float().cpu(), g.float().cpu()
    for r in rows[:5] + rows[-5:]:
        sims = (F.normalize(q[[r["index"]]], dim=-1) @ F.normalize(g, dim=-1).T)[0].tolist()
        ranked = sorted((j for j, n in enumerate(gallery.images) if n != r["reference"]),
                        key=lambda j: -sims[j])
        names = [gallery.images[j] for j in ranked]
        assert r["rank"] == names.index(r["target"]) + 1
        # images identical at 32 px tie exactly, and top-k picks any of them: compare the scores
        best = [sims[gallery.index[n]] for n in names if n != r["target"]][:3]
        assert [sims[gallery.index[n]] for n in r["top3"]] == pytest.approx(best, abs=1e-6)
        assert r["reference"] not in r["top3"] and r["target"] not in r["top3"]

# ---- zero-shot, FashionIQ and Shoes, your own triplets -------------------------------------------

def test_audit_zero_shot_clip(toy_root, micro_clip, tmp_path):
    """--clip without a run: train.py's toy settings (τ, GMM), the injected noise from the command
    line on top of the toy's own; no NFB labels to report."""
    s = audit.main(["--clip", str(micro_clip), "--dataset", "toy", "--data-root", str(toy_root),
                    "--noise", "0.2", "--noise-kind", "text", "--workers", "0",
                    "--out", str(tmp_path / "zs")])
    rows = _audit_rows(tmp_path / "zs")
    ds = data.CIRR(toy_root, "train", noise=triplets.Noise(0.2, "text", 0))
    assert len(rows) == len(ds) == 160
    assert not any("w_train" in r for r in rows) and "flagged_train" not in s
    truth = {r["index"]: r["noise"] for r in rows}
    assert [truth[i] for i in range(160)] == [triplets.NOISE_FIELDS[f]
                                              for f in ds.noise_field.tolist()]
    # injected text noise, the toy's own target noise
    assert {"text", "target"} <= set(truth.values())
    assert s["tau"] == runtime.PRESETS["toy"]["tau"] and s["gmm"] == "sklearn"
    assert (tmp_path / "zs" / "audit.png").is_file()

@pytest.mark.filterwarnings("ignore:nfb.py")   # identical placeholder images: equal losses, no GMM
def test_audit_fashioniq_and_shoes_identifiers(micro_clip, tmp_path):
    """The real FashionIQ / Shoes training annotations with images for a scattered few rows
    (--skip-missing drops the rest): each row's identifier names the row of the real file it came
    from."""
    fiq, cats = tmp_path / "fiq", ("dress", "toptee")
    have = set()
    for c in cats:
        for f in (f"captions/cap.{c}.train.json", f"image_splits/split.{c}.train.json"):
            (fiq / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(FIQ_ANN / f, fiq / f)
        rows = json.loads((FIQ_ANN / f"captions/cap.{c}.train.json").read_text())
        have |= {n for r in rows[7::25] for n in (r["candidate"], r["target"])}
        have.discard(rows[7]["target"])                               # row 7 loses its target image
    for n in have:
        _link(_tiny_png(tmp_path), fiq / "images" / f"{n}.png")
    audit.main(["--clip", str(micro_clip), "--dataset", "fashioniq", "--data-root", str(fiq),
                "--categories", *cats, "--skip-missing", "--workers", "0",
                "--out", str(tmp_path / "a-fiq")])
    real = {c: json.loads((FIQ_ANN / f"captions/cap.{c}.train.json").read_text()) for c in cats}
    expect = {(c, j) for c in cats for j, r in enumerate(real[c])
              if {r["candidate"], r["target"]} <= have}
    rows = _audit_rows(tmp_path / "a-fiq")
    assert {(r["category"], r["row"]) for r in rows} == expect and len(rows) == len(expect)
    assert ("dress", 7) not in expect and any(j > 7 for _, j in expect)
    for r in rows:
        raw = real[r["category"]][r["row"]]
        assert (r["reference"], r["target"], r["text"]) == (raw["candidate"], raw["target"],
                                                          data.fiq_text(raw["captions"]))

    shoes_rows = _shoes_rows()
    train_names = _shoes_names("train")
    picked = [j for j, r in enumerate(shoes_rows) if set(_pair(r)) <= set(train_names)][5::100]
    keep = {n for j in picked for n in _pair(shoes_rows[j])}
    root = make_shoes(tmp_path / "shoes", splits=("train",), drop=set(train_names) - keep)
    audit.main(["--clip", str(micro_clip), "--dataset", "shoes", "--data-root", str(root),
                "--skip-missing", "--workers", "0", "--out", str(tmp_path / "a-shoes")])
    rows = _audit_rows(tmp_path / "a-shoes")
    expect = {j for j, r in enumerate(shoes_rows) if set(_pair(r)) <= keep}
    assert {r["row"] for r in rows} == expect and len(rows) == len(expect) >= len(picked)
    for r in rows:
        raw = shoes_rows[r["row"]]
        assert (r["reference"], r["target"], r["text"]) == (*_pair(raw),
                                                          raw["RelativeCaption"].strip())

def test_e2e_own_triplets_train_audit_clean_and_train_on_the_cleaned_copy(toy_root, micro_clip,
                                                                          tmp_path, capsys):
    """The toy in the triplet format with 30% shuffle noise written into its training file (data.py
    convert --noise): train on it with the toy's preset, audit it (clean.jsonl without the triplets
    of w < 0.5, removed.jsonl with their scores, the command that trains on the cleaned copy), then
    train on clean.jsonl with that command. No step changes a row: the preset injects nothing, and
    every row the audit writes is a row of train.jsonl as it is there."""
    own = tmp_path / "own"
    data.main(["convert", "--dataset", "toy", "--data-root", str(toy_root), "--out", str(own),
               "--noise", "0.3"])
    printed = capsys.readouterr().out
    assert "train.jsonl (160 rows), val.jsonl (40 rows), test.jsonl (40 rows)" in printed
    ds = triplets.Triplets(own, "train")
    shuffled = data.CIRR(toy_root, "train", noise=triplets.Noise(0.3))
    assert torch.equal(ds.noise_field, shuffled.noise_field)         # the truth travels in the file
    capsys.readouterr()
    common = ["--dataset", "triplets", "--data-root", str(own), "--preset", "toy",
              "--clip", str(micro_clip), "--batch-size", "32", "--workers", "0", "--lr", "2e-3",
              "--lr-wcb", "2e-3"]
    out = train.main(common + ["--epochs", "3", "--out", str(tmp_path / "run")])
    assert "injected" not in capsys.readouterr().out
    assert json.loads((out / "args.json").read_text())["noise"] == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert set(log[-1]["metrics"]) == {"R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2",
                                       "Rsubset@3", "avg"}
    assert log[-1]["score"] == pytest.approx(
        sum(log[-1]["metrics"][f"R@{k}"] for k in (1, 5, 10, 50)) / 4)
    capsys.readouterr()
    s = audit.main(["--checkpoint", str(out / "last.pt"), "--workers", "0"])
    printed = capsys.readouterr().out
    kept = [json.loads(line) for line in (out / "clean.jsonl").read_text().splitlines()]
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    rows = {r["index"]: r for r in _audit_rows(out)}
    assert len(kept) + len(removed) == 160 == s["kept"] + s["removed"]
    assert s["removed"] == s["flagged"]
    file_rows = [json.loads(line) for line in (own / "train.jsonl").read_text().splitlines()]
    assert kept == [r for r in file_rows if r in kept]       # rows of the file, unchanged, in order
    assert sorted(map(json.dumps, kept + [{k: v for k, v in r.items() if k != "audit"}
                                          for r in removed])) == sorted(map(json.dumps, file_rows))
    assert all(r["audit"]["w"] < 0.5
               and set(r["audit"]) >= {"line", "w", "loss", "views", "flagged_by"}
               and file_rows[r["audit"]["line"] - 1] == {k: v for k, v in r.items() if k != "audit"}
               for r in removed)
    assert "and audit_summary.json in" in printed
    assert sorted(r["id"] for r in kept + removed) == sorted(t["pairid"] for t in ds.triplets)
    assert all(rows[i]["w"] >= 0.5 for i, t in enumerate(ds.triplets)
               if t["pairid"] in {r["id"] for r in kept})
    command = next(line for line in printed.splitlines()
                   if line.strip().startswith("python train.py"))
    assert command.split()[2:] == ["--dataset", "triplets", "--data-root", str(own), "--train-file",
                                   str(out / "clean.jsonl"), "--preset", "toy"]
    again = train.main(command.split()[2:] + common[6:]
                       + ["--epochs", "1", "--max-steps", "1", "--no-nfb",
                          "--out", str(tmp_path / "clean")])
    assert json.loads((again / "args.json").read_text())["train_file"] == str(out / "clean.jsonl")
    printed = capsys.readouterr().out
    assert f"Triplets train: {out / 'clean.jsonl'}: {len(kept)} triplets" in printed
    assert "injected" not in printed
    # SPN's stage 2 on the same folder: the bank holds every training image, stage 1's soft labels
    # carry over
    s2 = train.main(common + ["--epochs", "1", "--max-steps", "1", "--stage", "2",
                              "--init", str(out / "last.pt"), "--out", str(tmp_path / "s2")])
    assert len(torch.load(s2 / "bank.pt", weights_only=True)["bank"]) == len(ds.images)
    assert f"NFB: soft labels of {out / 'last.pt'} carried over" in capsys.readouterr().out

# ---- bad input -----------------------------------------------------------------------------------

def test_e2e_audit_bad_input_one_line_before_encoding(audit_run, toy_root, micro_clip, tmp_path,
                                                     monkeypatch):
    """A split without targets, another dataset than the run's, an output folder that cannot be
    written, --submission, bad noise flags: one line each, and nothing encoded."""
    root, out, _ = audit_run
    best = str(out / "best.pt")
    (tmp_path / "a-file").write_text("")

    def encoding(*a, **k):
        raise AssertionError("encoding started")
    monkeypatch.setattr(encode, "encode_images", encoding)
    zero_shot = ["--clip", str(micro_clip), "--dataset", "toy", "--data-root", str(toy_root)]
    for flags, expect in (
            (["--checkpoint", best, "--split", "test1"], "--split test1"),
            (["--checkpoint", best, "--dataset", "cirr"], "trained on toy, not cirr"),
            (["--checkpoint", best, "--out", str(tmp_path / "a-file" / "sub")], "--out"),
            (["--checkpoint", best, "--noise", "1.5"], "--noise 1.5"),
            ([*zero_shot, "--noise-kind", "swap"], "--noise-kind 'swap'"),
            ([*zero_shot[:3], "shoes", *zero_shot[4:], "--noise-kind", "partial"],
             "--noise-kind partial")):
        with pytest.raises((SystemExit, ValueError)) as e:
            audit.main(["--workers", "0", *flags])
        assert expect in str(e.value) and "\n" not in str(e.value), (flags, str(e.value))
    code, err = _cli("evaluate.py", "--audit", "--checkpoint", best)
    assert code == 2 and err == [
        "error: --audit has its own command now: python audit.py --checkpoint RUN/best.pt"]
    code, err = _cli("audit.py", "--checkpoint", best, "--out", str(tmp_path / "a-file" / "sub"))
    assert code != 0 and len(err) == 1 and err[0].startswith("error: --out ") and "a-file" in err[0]

# ==================================================================================================
# spn.py (more positives: triplets from a window of the similarity ranking)
# ==================================================================================================

# ---- generate_triplets ---------------------------------------------------------------------------

def _template_regexes():
    def one(t):
        parts = re.split(r"(\{ref\}|\{tgt\})", t)
        return re.compile("^" + "".join("(?P<ref>.+)" if s == "{ref}"
                                        else "(?P<tgt>.+)" if s == "{tgt}"
                                        else re.escape(s) for s in parts) + "$")
    return [one(t) for t in TEMPLATES]

def _follows_a_template(text, ref_cap, tgt_cap):
    for rx in _template_regexes():
        m = rx.match(text)
        if (m and m.groupdict().get("tgt") == tgt_cap
                and m.groupdict().get("ref", ref_cap) == ref_cap):
            return True
    return False

def _python_rank(feats, i, j):
    """1-based rank of j among the images other than i, by cosine similarity (ties: lower index
    first)."""
    f = [[float(x) for x in row] for row in feats]
    norm = lambda v: sum(x * x for x in v) ** 0.5
    sim = [sum(a * b for a, b in zip(f[i], f[k])) / (norm(f[i]) * norm(f[k]))
           for k in range(len(f))]
    order = sorted((k for k in range(len(f)) if k != i), key=lambda k: (-sim[k], k))
    return order.index(j) + 1

def _random_case(n=60, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # unnormalised on purpose: the ranking must be by cosine
    feats = torch.randn(n, d, generator=g) * 3.0
    names = [f"im{i}" for i in range(n)]
    caps = {nm: f"a scene number {i}" for i, nm in enumerate(names)}
    return feats, names, caps

def test_targets_inside_window_and_texts_follow_templates():
    torch.set_num_threads(1)
    feats, names, caps = _random_case()
    lo, hi = 5, 12
    out = generate_triplets(feats, names, caps, window=(lo, hi), per_image=3, seed=1)
    assert len(out) == 3 * len(names)
    pos = {n: i for i, n in enumerate(names)}
    for k, t in enumerate(out):
        i, j = pos[t["reference"]], pos[t["target"]]
        assert i == k // 3 and i != j                       # sources in order; never its own target
        assert lo <= _python_rank(feats, i, j) <= hi
        assert _follows_a_template(t["text"], caps[t["reference"]], caps[t["target"]]), t["text"]
    for i in range(len(names)):                             # per_image targets are distinct
        assert len({t["target"] for t in out[3 * i:3 * i + 3]}) == 3
    assert len({t["text"].split(" ")[0] for t in out}) > 1  # several templates used

def test_reproducible_by_seed_and_queries_subset():
    feats, names, caps = _random_case()
    a = generate_triplets(feats, names, caps, window=(2, 20), seed=3)
    assert a == generate_triplets(feats, names, caps, window=(2, 20), seed=3)
    assert a != generate_triplets(feats, names, caps, window=(2, 20), seed=4)
    sub = generate_triplets(feats, names, caps, window=(2, 20), seed=3, queries=[4, 7])
    assert [t["reference"] for t in sub] == ["im4", "im7"]
    for t in sub:
        assert 2 <= _python_rank(feats, names.index(t["reference"]), names.index(t["target"])) <= 20

def test_window_edges_and_bad_input():
    feats, names, caps = _random_case(n=10)
    out = generate_triplets(feats, names, caps, window=(1, 1))   # the nearest other image
    for t in out:
        i = names.index(t["reference"])
        assert _python_rank(feats, i, names.index(t["target"])) == 1
    out = generate_triplets(feats, names, caps, window=(3, 50))  # HI clipped to N - 1 = 9
    assert all(3 <= _python_rank(feats, names.index(t["reference"]), names.index(t["target"])) <= 9
               for t in out)
    with pytest.raises(ValueError, match="window"):
        generate_triplets(feats, names, caps, window=(12, 50))
    with pytest.raises(ValueError, match="per-image"):
        generate_triplets(feats, names, caps, window=(1, 2), per_image=3)
    partial = {k: v for k, v in caps.items() if k not in ("im2", "im5")}
    with pytest.raises(ValueError, match=r"2 of 10 images have no caption.*im2.*im5"):
        generate_triplets(feats, names, partial)

def test_generated_triplets_load_through_dataset(toy_root, tmp_path):
    base = data.CIRR(toy_root, "train")
    caps = json.loads((toy_root / "image_captions.json").read_text())
    feats = torch.randn(len(base.images), 16, generator=torch.Generator().manual_seed(0))
    out = generate_triplets(feats, base.images, caps, window=(10, 50), per_image=2, seed=0)
    path = tmp_path / "extra.json"
    path.write_text(json.dumps(out))
    ds = data.CIRR(toy_root, "train", extra_triplets=path)
    assert len(ds) == len(base) + len(out) == len(base) + 2 * len(base.images)
    ref, text, tgt, i = ds[len(base)]
    assert (ds.images[ref], text, ds.images[tgt]) == (out[0]["reference"], out[0]["text"],
                                                      out[0]["target"])
    assert not ds.noisy[len(base):].any()

# ---- python spn.py -------------------------------------------------------------------------------

def test_spn_cli_with_clip_and_with_checkpoint(toy_root, micro_clip, tmp_path, capsys):
    torch.set_num_threads(1)
    common = ["--dataset", "toy", "--data-root", str(toy_root), "--window", "3", "8",
              "--workers", "0", "--batch-size", "64"]
    out = tmp_path / "extra.json"
    trips = spn.main(common + ["--clip", str(micro_clip), "--out", str(out), "--seed", "5"])
    assert "wrote" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    base = data.CIRR(toy_root, "train")
    assert rows == trips and len(rows) == len(base.images)
    assert all(set(r) == {"reference", "target", "text"} and r["reference"] != r["target"]
               for r in rows)
    with_extra = data.CIRR(toy_root, "train", extra_triplets=out)
    assert len(with_extra) == len(base) + len(rows)
    # --references-only: one per training reference; a run checkpoint (WCB target-role features)
    # works as well
    ckpt = dict(model=CIRModel(M.load_clip(micro_clip, device="cpu")[0], wcb=True).state_dict(),
                args=dict(dataset="toy", no_wcb=False, wcb_maps=2, wcb_hidden=0, transform="clip"))
    torch.save(ckpt, tmp_path / "best.pt")
    rows = spn.main(common + ["--checkpoint", str(tmp_path / "best.pt"), "--out", str(out),
                              "--references-only", "--per-image", "2"])
    refs = {t["reference"] for t in base.triplets}
    assert len(rows) == 2 * len(refs) and {r["reference"] for r in rows} == refs

def test_spn_cli_on_your_own_triplets(toy_root, micro_clip, tmp_path, capsys):
    """spn.py --dataset triplets: positives over the images of a triplet folder's train.jsonl, names
    as the rows write them, read back by the folder's training split."""
    own = tmp_path / "own"
    data.main(["convert", "--dataset", "toy", "--data-root", str(toy_root), "--out", str(own)])
    ds = triplets.Triplets(own, "train")
    toy_caps = json.loads((toy_root / "image_captions.json").read_text())
    caps = {n: toy_caps[Path(n).stem] for n in ds.images}
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    rows = spn.main(["--dataset", "triplets", "--data-root", str(own),
                     "--captions", str(tmp_path / "caps.json"), "--clip", str(micro_clip),
                     "--window", "3", "8", "--workers", "0", "--out", str(tmp_path / "extra.json")])
    assert len(rows) == len(ds.images) and {r["reference"] for r in rows} == set(ds.images)
    more = triplets.Triplets(own, "train", extra_triplets=tmp_path / "extra.json")
    assert len(more) == len(ds) + len(rows)
    # rows with a category (not FashionIQ's pools): --references-only keeps every reference
    rows = [json.loads(line) for line in (own / "train.jsonl").read_text().splitlines()]
    (own / "train.jsonl").write_text("".join(json.dumps({**r, "category": "shapes"}) + "\n"
                                             for r in rows))
    refs = spn.main(["--dataset", "triplets", "--data-root", str(own), "--references-only",
                     "--captions", str(tmp_path / "caps.json"), "--clip", str(micro_clip),
                     "--window", "3", "8", "--workers", "0", "--out", str(tmp_path / "refs.json")])
    assert {r["reference"] for r in refs} == {r["reference"] for r in rows}
    with pytest.raises(SystemExit) as e:
        spn.main(["--dataset", "triplets", "--data-root", str(own), "--clip", str(micro_clip),
                  "--out", "x.json"])
    assert str(e.value) == ("error: --captions FILE is required for --dataset triplets "
                            "(JSON {image name: caption})")

def test_spn_cli_bad_inputs(toy_root, micro_clip, tmp_path, capsys):
    torch.set_num_threads(1)
    common = ["--dataset", "toy", "--data-root", str(toy_root), "--out", str(tmp_path / "x.json"),
              "--workers", "0"]
    with pytest.raises(SystemExit, match="--clip NAME_OR_PATH or --checkpoint"):
        spn.main(common)
    with pytest.raises(FileNotFoundError, match="captions file .*nope.json not found"):
        spn.main(common + ["--clip", str(micro_clip), "--captions", str(tmp_path / "nope.json")])
    caps = json.loads((toy_root / "image_captions.json").read_text())
    # 3 training images, 1 val image (not used)
    drop = ["train-0-1", "train-3-0", "train-7-5", "dev-0-0"]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({k: v for k, v in caps.items() if k not in drop}))
    args = common + ["--clip", str(micro_clip), "--captions", str(partial), "--window", "2", "5"]
    n_train = len(data.CIRR(toy_root, "train").images)
    with pytest.raises(ValueError, match=f"3 of {n_train} images have no caption.*train-0-1"):
        spn.main(args)
    rows = spn.main(args + ["--skip-missing-captions"])
    assert "have no caption: left out" in capsys.readouterr().out
    assert not {r["reference"] for r in rows} & set(drop)
    assert not {r["target"] for r in rows} & set(drop)

def test_spn_cli_wrong_data_root_before_any_model(tmp_path, monkeypatch):
    """A --data-root that does not exist is one line naming it, before a CLIP is loaded (RN50x4
    would be downloaded)."""
    def loading(*a, **k):
        raise AssertionError("a CLIP was loaded before the data root was checked")
    monkeypatch.setattr(runtime, "load_clip", loading)
    (tmp_path / "caps.json").write_text("{}")
    with pytest.raises((SystemExit, FileNotFoundError)) as e:
        spn.main(["--dataset", "cirr", "--data-root", str(tmp_path / "nowhere"), "--captions",
                  str(tmp_path / "caps.json"), "--clip", "RN50x4",
                  "--out", str(tmp_path / "x.json")])
    assert "nowhere" in str(e.value) and "\n" not in str(e.value)

def _fake_fiq(root, cats=("dress", "shirt"), n=12):
    """A tiny FashionIQ train split: n images and n // 2 triplets per category, random-colour 32 px
    PNGs."""
    g = torch.Generator().manual_seed(0)
    (root / "images").mkdir(parents=True)
    caps = {}
    for c in cats:
        names = [f"{c}{i}" for i in range(n)]
        for nm in names:
            col = tuple(int(x) for x in torch.randint(0, 256, (3,), generator=g))
            Image.new("RGB", (32, 32), col).save(root / "images" / f"{nm}.png")
            caps[nm] = f"a {c} in shade {nm}"
        rows = [dict(candidate=names[2 * i], target=names[2 * i + 1],
                     captions=["is darker", "has sleeves"]) for i in range(n // 2)]
        for sub, obj in (("captions", rows), ("image_splits", names)):
            (root / sub).mkdir(exist_ok=True)
            name = f"cap.{c}.train.json" if sub == "captions" else f"split.{c}.train.json"
            (root / sub / name).write_text(json.dumps(obj))
    (root / "caps.json").write_text(json.dumps(caps))
    return root

def test_spn_cli_fashioniq_pairs_within_category(micro_clip, tmp_path):
    torch.set_num_threads(1)
    root = _fake_fiq(tmp_path / "fiq")
    out = tmp_path / "extra.json"
    rows = spn.main(["--dataset", "fashioniq", "--data-root", str(root),
                     "--captions", str(root / "caps.json"), "--categories", "dress", "shirt",
                     "--clip", str(micro_clip), "--out", str(out), "--window", "1", "4",
                     "--workers", "0"])
    assert len(rows) == 24 and {r["category"] for r in rows} == {"dress", "shirt"}
    assert all(r["reference"].startswith(r["category"]) and r["target"].startswith(r["category"])
               for r in rows)
    ds = data.FashionIQ(root, ("dress", "shirt"), "train", extra_triplets=out)
    assert len(ds) == 12 + 24 and ds.triplets[-1]["category"] == "shirt"

# ==================================================================================================
# train.py
# ==================================================================================================

# ---- the epoch, stage 2's carry-over, messages ---------------------------------------------------

def test_batch_larger_than_the_training_set_is_one_line_before_the_model(toy_root, tmp_path,
                                                                         monkeypatch, capsys):
    """An epoch of 0 steps would report metrics of an untrained model: refused, before a CLIP is
    loaded."""
    monkeypatch.setattr(train, "load_clip", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        train.main(["--data-root", str(toy_root), "--batch-size", "256",
                    "--out", str(tmp_path / "run")])
    assert str(e.value) == ("error: --batch-size 256 is larger than the 160 training triplets: "
                            "an epoch would have no step; pass --batch-size 80 or less")

def test_messages_say_what_was_done(toy_root, capsys, monkeypatch):
    """The epoch line says when the gate found no noise (not an AUC of 0.5); a dataset's lines are
    printed by rank 0 only under torchrun; the toy's loader line names no CIRR layout."""
    assert train.nfb_line(dict(nfb_n_noisy=0, nfb_gated=True, nfb_auc=0.5)) == \
        " | NFB gate shut: no noise-like mode, every w = 1"
    assert train.nfb_line(dict(nfb_n_noisy=7, nfb_gated=False, nfb_auc=0.91)) == \
        " | NFB noisy 7 AUC 0.910"
    assert train.nfb_line(dict(loss=1.0)) == ""
    monkeypatch.setenv("RANK", "1")
    util.log("a dataset line", once=True)
    monkeypatch.setenv("RANK", "0")
    util.log("a dataset line", once=True)
    assert capsys.readouterr().out == "a dataset line\n"
    s = runtime.defaults("toy")
    s.data_root, s.noise = str(toy_root), 0.0
    data.dataset(s, "val")
    assert capsys.readouterr().out.startswith(f"toy val: annotations {toy_root}")

def test_stage_2_carries_stage_1_soft_labels_over_only_for_the_same_triplets(capsys, tmp_path):
    """train.carry_over: the noise filter takes stage 1's labels (no warm-up) when both stages
    read the same training triplets (runtime.triplet_changes: same noise, noise kind, seed, missing
    images, extra triplets, and the count); else it warms up."""
    settings = dict(noise=0.2, noise_kind="shuffle", seed=0, skip_missing=False,
                    extra_triplets=None, warmup_epochs=1, epochs=3, init="s1/best.pt")
    stage1 = NoiseFilter(10, warmup_epochs=0)
    stage1.weights = torch.linspace(0, 1, 10)

    def carried(init_args=settings, nfb=stage1.state_dict(), n=10, **change):
        args = SimpleNamespace(**{**settings, **change})
        fresh = NoiseFilter(n, warmup_epochs=1)
        run = train.Run(args, *[None] * 6, fresh, list(range(n)), None, [], None, Path("."))
        train.carry_over(run, dict(args=init_args, nfb=nfb))
        if run.nfb.active(0):
            assert torch.equal(run.nfb.weights, stage1.weights)
            return True
        assert (run.nfb.weights == 1).all()
        return False

    assert carried() and "5 pairs flagged" in capsys.readouterr().out
    for change in (dict(noise=0.3), dict(noise_kind="text"), dict(seed=1), dict(skip_missing=True),
                   dict(extra_triplets="extra.json")):
        assert not carried(**change)
        assert f"its triplets differ ({next(iter(change))})" in capsys.readouterr().out
    assert not carried(n=12) and "its triplets differ (count)" in capsys.readouterr().out
    assert not carried(nfb=None) and "it has no NFB" in capsys.readouterr().out
    # one epoch: a warm-up only where the labels are not carried over, and only then the warning
    assert carried(epochs=1) and capsys.readouterr().err == ""
    assert not carried(epochs=1, seed=1) and "every epoch is a warm-up" in capsys.readouterr().err
    torch.save(dict(model={}, args=vars(runtime.defaults("toy"))), tmp_path / "best.pt")
    runtime.settings(["--stage", "2", "--init", str(tmp_path / "best.pt"), "--epochs", "1"])
    assert capsys.readouterr().err == ""            # settings leave stage 2's warning to carry_over

def test_epoch_order_sees_only_kept_triplets_as_often_as_a_full_epoch():
    keep = torch.tensor([i % 3 != 0 for i in range(30)])        # 20 kept (--oracle: the clean ones)
    order = train.epoch_order(keep, torch.Generator().manual_seed(0), (0, 1))
    counts = torch.bincount(torch.tensor(order), minlength=30)
    assert len(order) == 30 and counts[~keep].sum() == 0 and set(counts[keep].tolist()) == {1, 2}
    shards = [train.epoch_order(keep, torch.Generator().manual_seed(0), (r, 2)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == sorted(order) and len(shards[0]) == len(shards[1]) == 15

# ---- training end to end -------------------------------------------------------------------------

def _train_args(root, clip, out, *extra):
    return ["--dataset", "toy", "--data-root", str(root), "--clip", str(clip), "--out", str(out),
            "--epochs", "2", "--batch-size", "32", "--workers", "0", "--lr", "1e-3",
            "--lr-wcb", "1e-3", "--noise", "0", "--warmup-epochs", "1", *extra]

@pytest.fixture(scope="module")
def toy_run(toy_root, micro_clip, tmp_path_factory):
    """A finished 2-epoch run on the toy (its own noise, the NFB from epoch 1): the run every
    test that needs one reads (evaluation, an exact resume's reference, a resume's settings,
    stage 2's init)."""
    return train.main(_train_args(toy_root, micro_clip, tmp_path_factory.mktemp("run") / "run"))

def test_e2e_train_and_evaluate_reproduces(toy_run, tmp_path):
    out = toy_run
    for f in ("best.pt", "last.pt", "log.jsonl", "args.json", "recall.png",
              "loss_hist_epoch000.png"):
        assert (out / f).is_file(), f
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    fields = {"loss", "lr", "metrics", "score", "nfb_means", "nfb_auc", "time_data", "time_step"}
    assert fields <= set(log[0])
    # toy's own noise is the ground truth
    assert log[1]["nfb_applied"] and 0.0 <= log[1]["nfb_auc"] <= 1.0
    best = max(log, key=lambda r: r["score"])
    metrics = evaluate.main(["--checkpoint", str(out / "best.pt"), "--workers", "0", "--show", "3"])
    assert metrics == pytest.approx(best["metrics"], abs=1e-6)
    assert (out / "show_toy_val.png").is_file() and (out / "metrics_toy_val.json").is_file()
    # the toy's test1 split keeps its answers aside (toy_test1_targets.json): scored like val
    test = evaluate.main(["--checkpoint", str(out / "best.pt"), "--split", "test1",
                          "--workers", "0"])
    assert set(test) == set(best["metrics"]) and 0 <= test["R@1"] <= test["R@50"] <= 100
    # CIRR-format test-server files from the toy's test1 split
    paths = evaluate.main(["--checkpoint", str(out / "best.pt"), "--split", "test1",
                           "--workers", "0", "--submission", str(tmp_path / "sub")])
    assert len(json.loads(paths[0].read_text())) == 2 + 40

def test_e2e_resume_is_exact(toy_root, micro_clip, toy_run, tmp_path, monkeypatch):
    full = toy_run                                  # the same run, never stopped
    # the same run killed during epoch 1's validation: last.pt holds epoch 0 only
    calls = {"n": 0}
    real = evaluate.evaluate_sets

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "evaluate_sets", dying)
    with pytest.raises(KeyboardInterrupt):
        train.main(_train_args(toy_root, micro_clip, tmp_path / "killed"))
    monkeypatch.setattr(evaluate, "evaluate_sets", real)
    assert torch.load(tmp_path / "killed/last.pt", weights_only=True)["epoch"] == 0
    train.main(["--resume", str(tmp_path / "killed"), "--workers", "0"])
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed/last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["nfb"]["weights"], b["nfb"]["weights"])
    assert a["history"][-1]["metrics"] == b["history"][-1]["metrics"]

def test_e2e_text_only_training_caches_tokens_and_freezes_images(toy_root, micro_clip, tmp_path):
    out = train.main(_train_args(toy_root, micro_clip, tmp_path / "txt", "--encoder", "text",
                                 "--epochs", "1"))
    before = torch.load(micro_clip, weights_only=True)
    after = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["model"]
    for k, v in before.items():
        if k.startswith("visual."):
            assert torch.equal(after["clip." + k], v), k
    assert not torch.equal(after["clip.token_embedding.weight"], before["token_embedding.weight"])

def _mini_shoes(tmp, n_train=48, n_test=30, n_unused=20):
    """A small Shoes root of real rows: the first train and test triplets and the test self-pair;
    split files of their images and a few unused eval images."""
    rows = _shoes_rows()
    names = {s: set(_shoes_names(s)) for s in data.SHOES_SPLITS}
    pick = {s: [r for r in rows if set(_pair(r)) <= names[s]] for s in names}
    selfpair = [r for r in pick["test"] if r["ReferenceImageName"] == r["ImageName"]]
    pick = {"train": pick["train"][:n_train], "test": pick["test"][:n_test] + selfpair}
    used = {s: list(dict.fromkeys(n for r in pick[s] for n in _pair(r))) for s in pick}
    used["test"] += [n for n in _shoes_names("test") if n not in used["test"]][:n_unused]
    return make_shoes(tmp, rows=pick["train"] + pick["test"], names=used)

@pytest.mark.filterwarnings("ignore:nfb.py")   # identical placeholder images: equal losses, no GMM
def test_e2e_shoes_train_evaluate_and_spn(micro_clip, tmp_path, capsys):
    """train.py --dataset shoes for two steps with injected noise: validation on the test split,
    best.pt by the mean of R@1/10/50; evaluate.py reproduces the logged metrics; zero-shot CLIP
    evaluates; spn.py pairs Shoes training images."""
    root = _mini_shoes(tmp_path / "shoes")
    out = train.main(["--dataset", "shoes", "--data-root", str(root), "--clip", str(micro_clip),
                      "--out", str(tmp_path / "run"), "--epochs", "1", "--max-steps", "2",
                      "--batch-size", "8", "--workers", "0", "--lr", "1e-3", "--lr-wcb", "1e-3",
                      "--noise", "0.2"])
    printed = capsys.readouterr().out
    assert "Shoes test: Attribute Discovery layout" in printed
    assert "--noise 0.2: shuffle noise injected into 8 of 48 triplets, in memory" in printed
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    m = log[0]["metrics"]
    assert set(m) == {"R@1", "R@10", "R@50", "avg"} and log[0]["score"] == m["avg"]
    assert m["avg"] == pytest.approx((m["R@1"] + m["R@10"] + m["R@50"]) / 3)
    assert m["R@50"] <= 100 * 30 / 31 + 1e-9             # the self-pair is one query, always a miss
    assert torch.load(out / "best.pt", weights_only=True)["args"]["dataset"] == "shoes"
    # the same batch size as training: the placeholder images tie, and ties follow the last bits
    again = evaluate.main(["--checkpoint", str(out / "best.pt"), "--workers", "0",
                           "--batch-size", "8"])
    assert again == pytest.approx(m, abs=1e-6) and (out / "metrics_shoes_test.json").is_file()
    zero = evaluate.main(["--clip", str(micro_clip), "--dataset", "shoes", "--data-root", str(root),
                          "--workers", "0", "--out", str(tmp_path / "zs.json")])
    assert set(zero) == set(m) and (tmp_path / "zs.json").is_file()
    before = set(Path.cwd().iterdir())     # zero-shot without --out: nothing written where we stand
    evaluate.main(["--clip", str(micro_clip), "--dataset", "shoes", "--data-root", str(root),
                   "--workers", "0"])
    assert set(Path.cwd().iterdir()) == before
    assert "pass --out FILE to save the metrics" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no val split"):
        evaluate.main(["--checkpoint", str(out / "best.pt"), "--split", "val", "--workers", "0"])
    train_names = (root / "train_im_names.txt").read_text().split()
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({n: f"a shoe {i}" for i, n in enumerate(train_names)}))
    made = spn.main(["--dataset", "shoes", "--data-root", str(root), "--captions", str(caps),
                     "--clip", str(micro_clip), "--window", "1", "5", "--workers", "0",
                     "--out", str(tmp_path / "extra.json")])
    assert len(made) == len(train_names)
    assert all({t["reference"], t["target"]} <= set(train_names) for t in made)

# ---- SPN's stage 2: more negatives, over a bank --------------------------------------------------

def test_e2e_stage2_bank_and_only_text_side_trains(toy_root, micro_clip, toy_run, tmp_path):
    stage1 = toy_run
    out = train.main(_train_args(toy_root, micro_clip, tmp_path / "s2", "--stage", "2", "--init",
                                 str(stage1 / "best.pt"), "--epochs", "1", "--lr", "1e-3"))
    before = torch.load(stage1 / "best.pt", weights_only=True)["model"]
    after = torch.load(out / "last.pt", weights_only=True)
    image_side = ("clip.visual.", "wcb_ref.", "wcb_tar.")
    changed = {k for k in before if not torch.equal(before[k], after["model"][k])}
    assert changed and all(not k.startswith(image_side) for k in changed)
    assert any(k.startswith("clip.transformer.") for k in changed)
    assert after["history"][0]["metrics"]["R@50"] > 0
    # the cached bank = the normalised target-role feature of every training image, one image
    # at a time
    bank = torch.load(out / "bank.pt", weights_only=True)
    ckpt = torch.load(stage1 / "best.pt", map_location="cpu", weights_only=True)
    model = runtime.build_model(ckpt).eval()
    gallery = data.CIRR(toy_root, "train")
    images = ImageSource.files(gallery, TK.make_transform("clip", model.clip.image_resolution))
    assert len(bank["bank"]) == len(gallery.images)
    # the run trained on the GPU there: bf16 autocast
    atol = 2e-2 if torch.cuda.is_available() else 1e-5
    with torch.no_grad():
        for i in (0, 7, len(gallery.images) - 1):
            tok = model.image_tokens(images.load([i]))
            assert torch.allclose(bank["bank"][i],
                                  F.normalize(model.image_features(tok, "tar")[0], dim=-1)[0],
                                  atol=atol)
            assert torch.allclose(bank["ref"][i], model.image_features(tok, "ref")[0][0], atol=atol)

# ---- DDP -----------------------------------------------------------------------------------------

def _step_run(model, net, rank=0, world=1, micro_batch=None, device="cpu", amp="auto"):
    """The state train_step reads: a hand-made Run around a model (no data: the batch is given).
    SGD, so that the step's update is the gradient itself; clipping far above the gradients'
    norm. amp: --amp on `device` (runtime.autocast: full precision on a CPU)."""
    args = SimpleNamespace(tau=0.05, div_weight=0.1, soft_label="weight", grad_clip=1e6,
                           micro_batch=micro_batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp, scaler = runtime.autocast(amp, torch.device(device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    images = SimpleNamespace(bank=None)                  # the batch is given: only the bank is read
    return train.Run(args, model, net, opt, sched, scaler, amp, None, None, images, [], None,
                     Path("."), rank, world, torch.device(device))

def _ddp_worker(rank, world, port, batch, state, out, micro=None):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = CIRModel(CLIP(**MICRO))
    model.load_state_dict(state)
    run = _step_run(model, torch.nn.parallel.DistributedDataParallel(model), rank, world, micro)
    tokens, ref, tgt, idx, w = batch
    n = len(idx) // world
    part = slice(rank * n, (rank + 1) * n)
    loss = torch.tensor(train.train_step(run, (tokens[part], ref[part], tgt[part], idx[part]),
                                         w[part]))
    dist.all_reduce(loss)
    if rank == 0:
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        torch.save((loss.item() / world, grads, model.state_dict()), out)
    dist.destroy_process_group()

@pytest.mark.parametrize("micro", [None, 2])
def test_e2e_ddp_two_processes_match_one(tmp_path, micro):
    """Two gloo processes with half the batch each (micro: in micro-batches of 2) = one process
    with the whole batch: train_step gives the same loss, the same gradients (targets are gathered
    with gradients) and the same weights after the step."""
    import torch.multiprocessing as mp
    torch.manual_seed(1)
    model = CIRModel(CLIP(**MICRO))
    with torch.no_grad():                  # non-zero α so the WCB heads take part in the gradients
        for head in (model.wcb_txt, model.wcb_ref, model.wcb_tar):
            head.alpha.fill_(0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    B = 8
    batch = (tokenize([f"make the {c} circle blue" for c in "abcdefgh"]), torch.randn(B, 3, 32, 32),
             torch.randn(B, 3, 32, 32), torch.arange(B), torch.rand(B))
    loss = train.train_step(_step_run(model, model), batch[:4], batch[4])
    ctx, port, out = mp.get_context("spawn"), _free_port(), tmp_path / "rank0.pt"
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, batch, state, out, micro))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    ddp_loss, grads, after = torch.load(out, weights_only=True)
    assert ddp_loss == pytest.approx(loss, rel=1e-5)
    ours = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ours) and _rel(grads, ours)[0] <= 1e-5
    assert _rel({k: after[k] for k in ours}, {k: dict(model.named_parameters())[k].detach()
                                              for k in ours})[0] <= 1e-5

def test_e2e_torchrun_two_processes_train(toy_root, micro_clip, tmp_path):
    """train.py under torchrun (gloo on CPU): DistributedSampler, the NFB's merged losses and
    broadcast soft labels, rank 0 alone writing."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "train.py", "--data-root", str(toy_root),
           "--clip", str(micro_clip), "--batch-size", "32", "--workers", "0", "--out", str(out)]
    # gloo, also on a GPU machine
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([*cmd, "--epochs", "2"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in log] == [0, 1]
    assert log[0]["nfb_n_seen"] == 160 - 160 % 32               # both ranks' losses reached the GMM
    ckpt = torch.load(out / "last.pt", weights_only=True)
    w = ckpt["nfb"]["weights"]
    # soft labels installed after the warm-up
    assert len(w) == 160 and torch.isfinite(w).all() and (w < 1).any()
    assert "Traceback" not in r.stderr

# ---- memory: --micro-batch (gradient caching), --grad-checkpoint -------------------------------

def _rel(a, b, floor=1e-2):
    """Max relative difference of two {name: tensor} (b the reference): per tensor, max |a - b| /
    max |b| over the tensors whose largest entry is at least `floor` of the set's largest; and over
    the whole set at once, max |a - b| / max |b|. Below the floor a gradient is a sum of terms that
    cancel, and fp32's rounding of them is what remains: a WCB scorer's bias and attention's key
    bias get exactly zero (softmax ignores a shift), the ViT's ln_post bias 0.3% of the largest
    (relative differences up to 1.4e-5 with one thread, 7e-6 with two). For weights: AdamW's
    step is lr · g / (|g| + 1e-6), so a near-zero gradient's rounding moves a weight by up to
    lr / 1e-6 of it (two thread counts do the same): the whole set's number is the one to read."""
    top = max(v.abs().max().item() for v in b.values())
    per = max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b
              if b[k].abs().max() >= floor * top)
    return per, max((a[k] - b[k]).abs().max().item() for k in b) / top

def _toy_steps(toy_root, micro_clip, tmp, flags, labels=None, steps=3):
    """`steps` optimizer steps of a toy run (AdamW, its schedule, group batches: repeated
    references) at batch 128 -> (losses, gradients after the first step, weights after the
    last). labels: the NFB's soft labels w (B,) as train_epoch gives them."""
    run = train.build(runtime.settings(["--data-root", str(toy_root), "--clip", str(micro_clip),
                                        "--batch-size", "128", "--workers", "0", "--no-nfb",
                                        "--out", str(tmp), *flags]))
    losses = []
    for epoch in range(steps):
        batch = train.on_device(run, next(iter(train.make_loader(run, epoch))))
        w = None if labels is None else torch.rand(128, generator=torch.Generator().manual_seed(
            epoch)).clamp_min(0.05)
        losses.append(train.train_step(run, batch, w))
        if epoch == 0:
            grads = {k: p.grad.clone() for k, p in run.model.named_parameters()
                     if p.grad is not None}
    assert len(grads) > 40 and len(set(batch[1].flatten(1).sum(1).tolist())) < 128  # repeats
    return losses, grads, {k: p.detach().clone() for k, p in run.model.named_parameters()}

@pytest.mark.parametrize("labels", [None, "weight", "complement"])
def test_micro_batch_gives_the_whole_batch_gradients(toy_root, micro_clip, tmp_path, labels):
    """--micro-batch 16 at batch 128 = the whole batch: the same loss, the same gradients after
    one step (the WCB's diversity penalty and the NFB's soft labels included, each image of a
    micro-batch through the tower once), the same weights after three AdamW steps."""
    flags = ["--soft-label", labels] if labels else []
    whole = _toy_steps(toy_root, micro_clip, tmp_path / "a", flags, labels)
    micro = _toy_steps(toy_root, micro_clip, tmp_path / "b", [*flags, "--micro-batch", "16"],
                       labels)
    assert micro[0] == pytest.approx(whole[0], rel=1e-6)
    assert max(_rel(micro[1], whole[1])) <= 1e-5
    assert _rel(micro[2], whole[2])[1] <= 1e-5

def test_micro_batch_with_spn_bank_and_frozen_tower_tokens():
    """SPN's stage 2 (queries against the bank: the bank's rows for targets, f_ref given) and
    --encoder text (a frozen tower's Tokens): micro-batches give the whole batch's step."""
    torch.manual_seed(2)
    model = CIRModel(CLIP(**MICRO))
    with torch.no_grad():
        for head in (model.wcb_txt, model.wcb_ref, model.wcb_tar):
            head.alpha.fill_(0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    B, bank = 8, F.normalize(torch.randn(50, 32), dim=-1)
    tokens = tokenize([f"make the {c} circle blue" for c in "abcdefgh"])
    w = torch.rand(B)
    cases = [(M.Features(torch.randn(B, 32)), torch.randint(0, 50, (B,)), bank),
             (M.Tokens(torch.randn(B, 5, 32)), M.Tokens(torch.randn(B, 5, 32)), None)]
    for ref, tgt, bank_rows in cases:
        out = []
        for micro in (None, 2):
            model.load_state_dict(state)
            run = _step_run(model, model, micro_batch=micro)
            run.images.bank = bank_rows
            loss = train.train_step(run, (tokens, ref, tgt, torch.arange(B)), w)
            out.append((loss, {k: p.grad.clone() for k, p in model.named_parameters()
                               if p.grad is not None}))
        assert out[1][0] == pytest.approx(out[0][0], rel=1e-6)
        assert set(out[1][1]) == set(out[0][1]) and _rel(out[1][1], out[0][1])[0] <= 1e-5

def _tiny_rn():
    torch.manual_seed(0)
    return CIRModel(CLIP(**M.TINY_CONFIGS["tiny-rn"])).train()

def test_grad_checkpoint_gives_the_same_step_and_running_statistics():
    """--grad-checkpoint on a ViT and a ModifiedResNet: the same loss and gradients; a recomputed
    BatchNorm leaves its running statistics as one forward left them."""
    B = 8
    tokens = tokenize([f"make the {c} circle blue" for c in "abcdefgh"])
    for make, res in ((lambda: CIRModel(CLIP(**MICRO)), 32), (_tiny_rn, 64)):
        images = torch.randn(2, B, 3, res, res, generator=torch.Generator().manual_seed(0))
        out = []
        for on in (False, True):
            torch.manual_seed(0)
            model = make()
            M.set_grad_checkpoint(model, on)
            loss = train.train_step(_step_run(model, model), (tokens, *images, torch.arange(B)),
                                    None)
            out.append((loss, {k: p.grad.clone() for k, p in model.named_parameters()
                               if p.grad is not None}, {k: b.clone() for k, b in
                                                        model.named_buffers()}))
        assert out[1][0] == pytest.approx(out[0][0], rel=1e-6)
        assert _rel(out[1][1], out[0][1])[0] <= 1e-5
        assert all(torch.equal(out[1][2][k], v) for k, v in out[0][2].items())

def test_micro_batch_counts_each_micro_batch_once_in_batch_norm():
    """ModifiedResNet's BatchNorm under --micro-batch normalises each micro-batch (as each process
    under DDP) and its running statistics see each micro-batch once: the same buffers as one
    training-mode forward of each micro-batch in cached_backward's order (the last one's graph is
    kept from the first pass, the others' first pass counts none)."""
    B, n = 8, 4
    tokens = tokenize([f"make the {c} circle blue" for c in "abcdefgh"])
    images = torch.randn(2, B, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model = _tiny_rn()
    train.train_step(_step_run(model, model, micro_batch=n), (tokens, *images, torch.arange(B)),
                     None)
    ref = _tiny_rn()
    with torch.no_grad():
        for s in (B - n, *range(0, B - n, n)):
            ref(tokens[s:s + n], images[0, s:s + n], images[1, s:s + n])
    assert all(torch.equal(b, dict(ref.named_buffers())[k]) for k, b in model.named_buffers())
    assert not all(torch.equal(b, dict(_tiny_rn().named_buffers())[k])
                   for k, b in model.named_buffers())

def test_memory_tool_counts_what_a_real_step_allocates_and_meets_the_targets():
    """tools.memory on fake tensors = the same accounting on the CPU's real tensors, byte for byte;
    at batch 512, --micro-batch 32 keeps <= 1/8 of the whole batch's activations and
    --grad-checkpoint far fewer; the released architectures are OpenAI's (RELEASED)."""
    from tools import memory
    a = memory.settings(["--clip", "tiny", "--batch-size", "32", "--amp", "none",
                         "--micro-batch", "8"])
    assert memory.measure(a, fake=True) == memory.measure(a, fake=False)
    act = {}
    for flags in ([], ["--micro-batch", "32"], ["--grad-checkpoint"]):
        a = memory.settings(["--clip", "tiny", "--batch-size", "512", "--amp", "none", *flags])
        act[tuple(flags)] = memory.measure(a)["activations"]
    assert act[("--micro-batch", "32")] <= act[()] / 8
    assert act[("--grad-checkpoint",)] <= act[()] / 2
    assert set(memory.ARCHS) == set(RELEASED)
    for name, cfg in memory.ARCHS.items():
        e, res, vl, vw, patch, tw, th, tl = RELEASED[name]
        assert cfg == dict(embed_dim=e, image_resolution=res, vision_layers=vl, vision_width=vw,
                           vision_patch_size=patch, context_length=77, vocab_size=49408,
                           transformer_width=tw, transformer_heads=th, transformer_layers=tl)

# ---- CUDA: autocast, micro-batches, NCCL, retrieval on the GPU -----------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

@pytest.fixture
def no_tf32():
    """fp32 products in full precision while a test runs: cuDNN's convolutions use TF32 by default
    (a 10-bit mantissa, ~1e-3 relative), far above the fp32 tolerances below."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

def _micro_cir(device):
    """The DDP test's micro model, the same weights at every call; WCB α = 0.5 so that the heads
    take part in the gradients."""
    torch.manual_seed(1)
    model = CIRModel(CLIP(**MICRO))
    with torch.no_grad():
        for head in (model.wcb_txt, model.wcb_ref, model.wcb_tar):
            head.alpha.fill_(0.5)
    return model.to(device)

def _cuda_batch(B=8):
    """tokens, ref, tgt, idx and soft labels w (B,). The texts grow longer: each micro-batch's text
    stops at its own last EOT (a shorter sequence than the whole batch's)."""
    g = torch.Generator().manual_seed(0)
    texts = [f"make the {c} circle " + "much " * k + "bluer" for k, c in enumerate("abcdefgh")]
    return (tokenize(texts[:B]), torch.randn(B, 3, 32, 32, generator=g),
            torch.randn(B, 3, 32, 32, generator=g), torch.arange(B), torch.rand(B, generator=g))

def _one_step(device, amp="none", micro_batch=None, wrap=None, world=1):
    """One train_step of the micro model on _cuda_batch -> (loss, {name: gradient}, {name: weight
    after the step}), fp32 on the CPU. wrap: the net around the model (DDP); world: the Run's."""
    model = _micro_cir(device)
    run = _step_run(model, model if wrap is None else wrap(model), world=world, device=device,
                    amp=amp, micro_batch=micro_batch)
    *batch, w = (x.to(device) for x in _cuda_batch())
    for _ in range(30):  # fp16: an inf at the scaler's scale skips the step, the weights stay;
        loss = train.train_step(run, tuple(batch), w)  # training goes on at half the scale: so here
        grads = {k: p.grad.float().cpu() for k, p in model.named_parameters() if p.grad is not None}
        if all(g.isfinite().all() for g in grads.values()):
            break
    return loss, grads, {k: p.detach().float().cpu() for k, p in model.named_parameters()}

def _rel_l2(a, b):
    """|a - b| / |b| over all tensors together (the gradient as one vector)."""
    assert set(a) == set(b)
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in b)
    return (diff / sum((v ** 2).sum() for v in b.values())).sqrt().item()

# bf16 keeps 8 significant bits (a rounding errs by up to 2^-9 ≈ 2e-3), fp16 11 (2^-12 ≈ 2.4e-4).
# On a CPU's autocast (the same casts of the matrix products), 5 seeds: loss errors at most bf16
# 2.2e-3, fp16 6.4e-4; gradient errors (relative L2, every tensor as one vector; a small tensor's
# own error reached 1.2 in bf16) 2.3e-2 and 2.7e-3. The bounds leave ~4.5x for the GPU's kernels
# (cuBLAS may add bf16 / fp16 split-K partial sums in low precision).
AUTOCAST_TOL = {"bf16": (1e-2, 0.1), "fp16": (3e-3, 0.015)}    # (loss relative, gradient rel. L2)

def _check_autocast_step(device):
    """One step under bf16 and fp16 autocast (fp16 with its GradScaler), whole batch and
    micro-batches, against fp32: the loss and the gradient within the precision's error, and not
    equal (the autocast did act)."""
    loss, grads, _ = _one_step(device, "none")
    for amp, (tol_loss, tol_grad) in AUTOCAST_TOL.items():
        ctx, scaler = runtime.autocast(amp, device)             # bf16 where the GPU has it
        bf16 = amp == "bf16" and torch.cuda.is_bf16_supported()
        assert ctx.fast_dtype == (torch.bfloat16 if bf16 else torch.float16)
        assert scaler.is_enabled() == (not bf16)
        for micro_batch in (None, 2):                  # gradient caching under autocast too
            amp_loss, amp_grads, _ = _one_step(device, amp, micro_batch=micro_batch)
            assert amp_loss == pytest.approx(loss, rel=tol_loss), (amp, micro_batch)
            assert 0 < _rel_l2(amp_grads, grads) <= tol_grad, (amp, micro_batch)

@cuda
def test_cuda_step_under_fp16_and_bf16_autocast_matches_fp32(no_tf32):
    _check_autocast_step(torch.device("cuda"))

def _check_micro_batch(device):
    """--micro-batch N (gradient caching) = the whole batch: loss, gradients, weights after."""
    loss, grads, after = _one_step(device)
    for n in (1, 2, 4):
        mb_loss, mb_grads, mb_after = _one_step(device, micro_batch=n)
        assert mb_loss == pytest.approx(loss, rel=1e-5), n
        assert set(mb_grads) == set(grads) and _rel(mb_grads, grads)[0] <= 1e-5, n  # CPU: 4e-6
        assert _rel(mb_after, after)[0] <= 1e-5, n        # zero-initialised biases: -lr·grad

@cuda
def test_cuda_micro_batch_gives_the_whole_batch_gradients(no_tf32):
    _check_micro_batch(torch.device("cuda"))

def _check_ddp_one_process(device, backend, monkeypatch):
    """DDP over `backend` on a group of one = the model alone, whole batch and micro-batches; with
    the Run's world set to 2 the micro-batches take cached_backward's no_sync path (gradients
    accumulated, all-reduced once after the last), as under torchrun."""
    import torch.distributed as dist
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    loss, grads, after = _one_step(device)
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        ids = [device.index or 0] if device.type == "cuda" else None
        wrap = lambda m: torch.nn.parallel.DistributedDataParallel(m, device_ids=ids)
        for micro_batch, world in ((None, 1), (2, 1), (2, 2)):
            d_loss, d_grads, d_after = _one_step(device, micro_batch=micro_batch, wrap=wrap,
                                                 world=world)
            assert d_loss == pytest.approx(loss, rel=1e-5), (micro_batch, world)
            assert set(d_grads) == set(grads), (micro_batch, world)
            assert _rel(d_grads, grads)[0] <= 1e-5, (micro_batch, world)
            assert _rel(d_after, after)[0] <= 1e-5, (micro_batch, world)
    finally:
        dist.destroy_process_group()

@cuda
def test_cuda_ddp_over_nccl_in_one_process(no_tf32, monkeypatch):
    _check_ddp_one_process(torch.device("cuda", 0), "nccl", monkeypatch)

def _check_retrieval_and_views(device):
    """CIRR's metrics, top-50 lists and ranks on the device = on the CPU, exactly: features of ±1
    entries, 64 of them, normalise to ±1/8 and every product and sum is exact in fp32 (ties too:
    both sides break them by gallery order). The NFB's views: fp32 on both, close."""
    rows = json.loads((CIRR_ANN / "captions/cap.rc2.val.json").read_text())
    names = list(json.loads((CIRR_ANN / "image_splits/split.rc2.val.json").read_text()))
    index = {n: i for i, n in enumerate(names)}
    g = torch.Generator().manual_seed(0)
    gallery = torch.randint(0, 2, (len(names), 64), generator=g).float() * 2 - 1    # (G, 64) ±1
    tgt = torch.tensor([index[r["target_hard"]] for r in rows])                        # (Q,)
    ref = torch.tensor([index[r["reference"]] for r in rows])                          # (Q,)
    # a query is its target with a share (0..1/2) of its signs flipped: ranks from 0 to far
    flips = torch.rand(len(rows), 64, generator=g) < torch.rand(len(rows), 1, generator=g) / 2
    queries = gallery[tgt] * (1 - 2 * flips.float())                                   # (Q, 64)
    names_of = ([r["reference"] for r in rows], [r["target_hard"] for r in rows],
                [r["img_set"]["members"] for r in rows])
    on = lambda x: x.to(device)
    cpu = cirr_metrics(queries, gallery, names, *names_of, chunk=128)
    assert 0 < cpu["R@1"] < cpu["R@50"] < 100 and 0 < cpu["Rsubset@1"] < 100
    assert cirr_metrics(on(queries), on(gallery), names, *names_of, chunk=128) == cpu
    assert torch.equal(evaluate.topk(on(queries), on(gallery), 50, on(ref), chunk=128),
                       evaluate.topk(queries, gallery, 50, ref, chunk=128))
    assert torch.equal(evaluate._ranks(on(queries), on(gallery), tgt, ref, chunk=128),
                       evaluate._ranks(queries, gallery, tgt, ref, chunk=128))
    # the NFB's views of 2,000 pairs (1,500 texts, 1,000 images, D 640) at CLIP's tau: the indices
    # stay on the CPU as pair_features gives them; 50 self-pairs keep their target
    n, U, N, D, tau = 2000, 1500, 1000, 640, 0.01
    pf = dict(f_txt=torch.randn(U, D, generator=g), text_idx=torch.randint(0, U, (n,), generator=g),
              f_ref=torch.randn(n, D, generator=g),
              gallery=F.normalize(torch.randn(N, D, generator=g), dim=-1),
              tgt_idx=torch.randint(0, N, (n,), generator=g),
              ref_idx=torch.randint(0, N, (n,), generator=g))
    pf["ref_idx"][:50] = pf["tgt_idx"][:50]
    views = nfb.pair_views(nfb.PairFeatures(**pf), nfb.VIEWS, tau)
    moved = {k: on(v) if v.is_floating_point() else v for k, v in pf.items()}
    dev_views = nfb.pair_views(nfb.PairFeatures(**moved), nfb.VIEWS, tau)
    for name, v in views.items():
        # fp32 against fp64 on a CPU: at most 7e-6 (query), 4e-5 (text, change); two fp32 results
        # differ by twice that at most: 1e-3 is far above
        assert v.isfinite().all() and v.std() > 0.1, name
        assert torch.allclose(dev_views[name].cpu(), v, rtol=0, atol=1e-3), name

@cuda
def test_cuda_retrieval_and_noise_views_match_the_cpu(no_tf32):
    _check_retrieval_and_views(torch.device("cuda"))

def test_gpu_check_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    """tools.gpu_check on a machine without CUDA: one line saying so, exit code 2, no report; its
    placeholder CIRR (the real val rows, one PNG under every name) reads as CIRR does."""
    from tools import gpu_check
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--out", str(tmp_path / "r.json")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and not (tmp_path / "r.json").exists()
    assert r.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); run it on a machine "
        "with one"]
    root = gpu_check.placeholder_cirr(tmp_path / "cirr", 700)
    assert len(data.CIRR(root, "train")) >= 700 and len(data.CIRR(root, "val")) == 300

# ---- bad input: one clear line -------------------------------------------------------------------

def test_e2e_bad_input_gives_one_clear_line(micro_clip, tmp_path):
    """Files that are missing, corrupt, of another dataset or without the dataset's annotations:
    one line naming the file."""
    code, err = _cli("evaluate.py", "--checkpoint", str(tmp_path / "nope.pt"))
    assert code != 0 and len(err) == 1 and "nope.pt not found" in err[0]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code, err = _cli("evaluate.py", "--checkpoint", str(tmp_path / "junk.pt"))
    assert code != 0 and len(err) == 1 and "junk.pt" in err[0] and "corrupt" in err[0]
    ckpt = {"model": {}, "args": {"dataset": "toy"}}
    torch.save(ckpt, tmp_path / "toy.pt")
    code, err = _cli("evaluate.py", "--checkpoint", str(tmp_path / "toy.pt"), "--dataset", "cirr")
    assert code != 0 and len(err) == 1 and "trained on toy" in err[0]
    (tmp_path / "empty").mkdir()                 # a folder without CIRR's files: data.py names them
    code, err = _cli("train.py", "--dataset", "cirr", "--data-root", str(tmp_path / "empty"),
                     "--clip", str(micro_clip), "--out", str(tmp_path / "run"))
    assert code != 0 and len(err) == 1 and "empty" in err[0] and "captions" in err[0], err

def test_e2e_corrupt_image_in_a_loader_worker_gives_one_line(toy_root, micro_clip, tmp_path):
    root = Path(shutil.copytree(toy_root, tmp_path / "toy"))
    split = json.loads((root / "image_splits" / "split.rc2.train.json").read_text())
    bad = root / next(iter(split.values()))
    bad.write_bytes(bad.read_bytes()[:40])                        # a truncated PNG
    code, err = _cli("train.py", "--data-root", str(root), "--clip", str(micro_clip),
                     "--workers", "1", "--epochs", "1", "--batch-size", "32", "--no-nfb",
                     "--out", str(tmp_path / "run"))
    # progress bars and their clearing
    err = [line for line in err if line.strip() and "%|" not in line]
    assert code != 0 and len(err) == 1, err
    assert err[0].startswith(f"error: cannot read image {bad}") and "--skip-missing" in err[0], err

# ==================================================================================================
# runtime.py (settings, DDP helpers, precision, checkpoints)
# ==================================================================================================

# ---- settings ------------------------------------------------------------------------------------

def test_settings_resolve_presets_then_stage_2_then_the_command_line(tmp_path):
    """The dataset's presets fill what the command line leaves open, stage 2's presets go over
    them, and a flag given wins over both; an --init checkpoint's model wins over the flags."""
    s = runtime.settings(["--dataset", "cirr", "--data-root", str(tmp_path)])
    assert (s.clip, s.epochs, s.lr, s.lr_wcb, s.tau) == ("RN50x4", 10, 2e-6, 1e-4, 0.01)
    assert (s.transform, s.amp, s.workers, s.cache_images, s.group_batches, s.noise) == (
        "targetpad", "auto", 2, False, False, 0.0)
    init = tmp_path / "best.pt"
    torch.save(dict(model={}, args={**vars(runtime.defaults("cirr")), "clip": "ViT-B/32",
                                    "wcb_maps": 3}), init)
    s = runtime.settings(["--dataset", "cirr", "--data-root", str(tmp_path), "--stage", "2",
                        "--init", str(init), "--tau", "0.03", "--workers", "0"])
    assert (s.epochs, s.lr, s.lr_wcb, s.tau, s.workers, s.wd) == (3, 2e-5, 1e-4, 0.03, 0, 0.05)
    assert (s.clip, s.wcb_maps) == ("ViT-B/32", 3)
    toy_s = runtime.settings([])
    assert (toy_s.dataset, toy_s.clip, toy_s.tau, toy_s.cache_images, toy_s.data_root) == (
        "toy", "tiny", 0.05, True, str(toy.default_toy_root().resolve()))
    resolved = ("data_root", "out")                   # resolved by settings, left open by defaults
    assert {k: v for k, v in vars(runtime.defaults("toy")).items() if k not in resolved} == \
        {k: v for k, v in vars(toy_s).items() if k not in resolved}

def _settings_errors(toy_dir):
    """(train.py flags, the start of the error line after `error: `) of settings that cannot
    work."""
    toy_args = ["--data-root", str(toy_dir)]
    return [
        (["--epochs", "-1", *toy_args], "--epochs -1"),
        (["--tau", "0", *toy_args], "--tau 0.0"),
        (["--nfb-gate", "-1", *toy_args], "--nfb-gate -1.0"),
        (["--nfb-views", "text", "query", *toy_args],
         "--nfb-views text query: list each view once, query first"),
        (["--nfb-views", "query", "text", "text", *toy_args], "--nfb-views query text text"),
        (["--nfb-budget", "0.02", *toy_args],
         "--nfb-budget was removed: it was measured and lost; its numbers "
         "are in docs/choices.md, 'Tried and dropped'"),
        (["--soft-label", "spread", *toy_args],
         "--soft-label spread was removed: it was measured and lost"),
        (["--nfb-views", "query", "subset", *toy_args], "--nfb-views subset was removed"),
        (["--nfb-text-temp=1", *toy_args],
         "--nfb-text-temp was removed: it is fixed now (docs/choices.md"),
        (["--no-group-batches", *toy_args],
         "--no-group-batches was removed: it is part of the dataset's preset"),
        (["--no-plots", *toy_args], "--no-plots was removed: the plots are always drawn now"),
        (["--nfb-teacher", "ema", *toy_args],
         "--nfb-teacher was removed: it was measured and lost; its numbers are "
         "in docs/choices.md, 'Tried and dropped'"),
        (["--nfb-keep=share", *toy_args], "--nfb-keep was removed"),
        (["--train-file", "clean.jsonl", *toy_args],
         "--train-file clean.jsonl: only with --dataset triplets"),
        (["--data-root", str(REPO / "README.md")],
         f"--data-root {REPO / 'README.md'}: a file, not a folder"),
        (["--dataset", "triplets", "--data-root", str(toy_dir.parent),
          "--train-file", "nope.jsonl"], "--train-file nope.jsonl: no such file"),
        (["--noise", "1.5", *toy_args], "--noise 1.5"),
        (["--noise-kind", "swap", *toy_args], "--noise-kind 'swap'"),
        (["--wcb-maps", "1", *toy_args], "--wcb-maps 1"),
        (["--stage", "2", *toy_args], "--stage 2 needs --init"),
        (["--micro-batch", "48", *toy_args], "--micro-batch 48: must divide the batch of each "
         "process, 128 (--batch-size 128 over 1), and not exceed it; e.g. --micro-batch 32"),
        (["--micro-batch", "256", *toy_args], "--micro-batch 256: must divide"),
        (["--micro-batch", "-4", *toy_args], "--micro-batch -4: must divide"),
        (["--grad-checkpoint", "--encoder", "text", *toy_args],
         "--grad-checkpoint is for fine-tuning both towers, and --encoder text freezes the image "
         "tower"),
        (["--clip", "ViT-Z/1", *toy_args], "--clip ViT-Z/1: not a released model"),
        (["--dataset", "fashioniq", "--data-root", str(toy_dir.parent), "--noise", "0.2",
          "--noise-kind", "partial"], "--noise-kind partial"),
        (["--dataset", "cirr", "--data-root", str(toy_dir.parent), "--oracle"], "--oracle"),
        (["--dataset", "cirr", "--data-root", "/nonexistent", "--clip", "RN50x4"],
         "--data-root /nonexistent: no such folder"),
    ]

def test_settings_errors_are_one_line_naming_the_flag(tmp_path, capsys):
    """runtime.settings stops on each setting that cannot work with argparse's exit code and one
    line; the toy folder named by --data-root is not generated (the subprocess test runs the
    command line itself)."""
    for flags, expect in _settings_errors(tmp_path / "toy"):
        with pytest.raises(SystemExit) as e:
            runtime.settings(flags)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, (flags, err)
        assert err[0].startswith(f"error: {expect}"), (flags, err)
    assert not (tmp_path / "toy").exists()

def test_e2e_settings_errors_one_line_before_any_data_or_model(tmp_path):
    """A bad setting stops train.py / evaluate.py with one line `error: <flag> ...` before
    anything is read or written: the toy folder named by --data-root is not generated, and with
    an empty HOME nothing lands in it, so no CLIP was fetched into ~/.cache/clip (RN50x4 would
    be, were the data root not checked first)."""
    home, toy_dir = tmp_path / "home", tmp_path / "toy"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), OMP_NUM_THREADS="1")
    asked = ("--epochs", "--tau", "--noise", "--wcb-maps", "--stage")
    cases = [(["train.py", *flags], expect) for flags, expect in _settings_errors(toy_dir)
             if flags[0] in asked or "RN50x4" in flags]
    cirr = ["--clip", "RN50x4", "--dataset", "cirr", "--data-root", "/nonexistent"]
    cases.append((["evaluate.py", *cirr], "--data-root /nonexistent: no such folder"))
    assert len(cases) == 7
    # side by side: each only starts Python and parses its flags
    procs = [subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for cmd, _ in cases]
    for (cmd, expect), p in zip(cases, procs):
        err = p.communicate(timeout=120)[1].strip().splitlines()
        # argparse's error code: 2
        assert p.returncode == (2 if cmd[0] == "train.py" else 1), (cmd, err)
        assert len(err) == 1 and err[0].startswith(f"error: {expect}"), (cmd, err)
    # CUDA's own cache
    assert not toy_dir.exists() and not [p for p in home.rglob("*") if ".nv" not in p.parts]

def test_settings_warn_when_the_warm_up_leaves_no_epoch_to_the_filter(capsys):
    """--warmup-epochs at or past --epochs: the filter's labels would never be used; one warning
    line (an error would stop the short runs that mean it), none with --no-nfb."""
    runtime.settings(["--epochs", "2", "--warmup-epochs", "2"])
    assert capsys.readouterr().err.strip().splitlines() == [
        "warning: --warmup-epochs 2 >= --epochs 2: every epoch is a warm-up, the noise filter's "
        "labels are never used (pass --no-nfb, or more --epochs)"]
    runtime.settings(["--epochs", "2", "--warmup-epochs", "2", "--no-nfb"])
    runtime.settings(["--epochs", "2", "--warmup-epochs", "1"])
    assert capsys.readouterr().err == ""

def test_settings_given_again_on_resume_are_checked(tmp_path, capsys):
    """--workers given again with --resume meets the same rule as in a new run, before anything is
    read."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"")        # settings only look for it: args.json holds the run's
    (run / "args.json").write_text(json.dumps(vars(runtime.defaults("toy"))))
    with pytest.raises(SystemExit) as e:
        runtime.settings(["--resume", str(run), "--workers", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["error: --workers -1: must be >= 0"]

def test_e2e_resume_takes_the_runs_own_settings(toy_run, capsys):
    """--resume: the settings are the run's args.json, whatever the dataset's presets say; --epochs,
    --amp, --workers, --micro-batch and --grad-checkpoint given again are applied (--epochs extends
    the run; the memory flags change no result but through ModifiedResNet's BatchNorm); any other
    setting given with another value is refused in one line naming it; a finished run says so and
    stops before anything is loaded."""
    saved = json.loads((toy_run / "args.json").read_text())
    # not presets
    assert (saved["epochs"], saved["batch_size"], saved["noise"], saved["workers"]) == (2, 32, 0, 0)
    with pytest.raises(SystemExit) as e:
        runtime.settings(["--resume", str(toy_run)])
    assert e.value.code == 0 and capsys.readouterr().out == (
        f"{toy_run}: the run has trained 2 epochs of its 2; nothing to resume (pass --epochs N > 2 "
        "to train it longer)\n")
    s = runtime.settings(["--resume", str(toy_run / "last.pt"), "--epochs", "3", "--workers", "3",
                          "--amp", "none", "--micro-batch", "8", "--grad-checkpoint"])
    assert vars(s) == {**saved, "resume": str(toy_run / "last.pt"), "epochs": 3, "workers": 3,
                       "amp": "none", "micro_batch": 8, "grad_checkpoint": True}
    s = runtime.settings(["--resume", str(toy_run), "--epochs", "3", "--noise", "0", "--data-root",
                          os.path.relpath(saved["data_root"])])     # the run's own values: accepted
    assert s.epochs == 3 and s.data_root == saved["data_root"]
    for flags, name in ((["--noise", "0.1"], "--noise 0.1"), (["--lr", "0.5"], "--lr 0.5"),
                        (["--no-nfb"], "--no-nfb True")):
        with pytest.raises(SystemExit) as e:
            runtime.settings(["--resume", str(toy_run), "--epochs", "3", *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: --resume {toy_run}: {name} differs from the run's"), err

def test_help_says_defaults_and_describe_wraps_the_settings(tmp_path, capsys, monkeypatch):
    """--help names every flag's default (the preset-dependent ones for the toy and real data); the
    settings a run prints are wrapped within 100 characters, with FashionIQ's categories only for
    FashionIQ, paths absolute, and frozen."""
    with pytest.raises(SystemExit):
        runtime.settings(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expect in ("epochs to train (with --resume: extends the run) (preset: toy 7, real data 10)",
                   "(default: 0.02)", "(default: sklearn)", "ViT-B/32", "tiny-s",
                   "fraction of training triplets to corrupt in memory"):
        assert expect in text, expect
    monkeypatch.chdir(tmp_path)
    (tmp_path / "own").mkdir()
    s = runtime.settings(["--dataset", "triplets", "--data-root", "own"])
    lines = runtime.describe(s).splitlines()
    assert lines[0] == "settings:" and all(len(line) <= 100 for line in lines)
    text = " ".join(lines)
    assert f"data_root={tmp_path / 'own'}" in text
    assert "categories=" not in text and "noise=0.0" in text
    assert "clip=RN50x4" in text and f"out={tmp_path / 'runs'}" in text and "wd=0.05" in text
    with pytest.raises(AttributeError, match="frozen"):
        s.lr = 1.0

# ---- DDP helpers ---------------------------------------------------------------------------------

def test_e2e_gather_rows_over_two_processes(sharded):
    """gather_rows: uneven shares (4 + 3 rows) back in order on every rank; one process: x itself.
    """
    _, ranks, _ = sharded
    for r in ranks:
        assert torch.equal(r["rows"], torch.arange(21.0).view(7, 3))
    one = torch.arange(6.0)
    assert runtime.gather_rows(one, 6) is one

# ---- precision, checkpoints ----------------------------------------------------------------------

def test_autocast_on_cpu_is_full_precision_with_a_disabled_scaler():
    """On a CPU every --amp is fp32, and the GradScaler's calls pass through: scale gives the
    loss itself."""
    x = torch.randn(4, 4, requires_grad=True)
    for amp in ("auto", "bf16", "fp16", "none"):
        ctx, scaler = runtime.autocast(amp, torch.device("cpu"))
        with ctx:
            y = (x @ x).sum()
        assert y.dtype == torch.float32
        assert isinstance(scaler, torch.amp.GradScaler) and not scaler.is_enabled()
        assert scaler.scale(y) is y

def test_checkpoints_load_in_one_line_and_build_the_model(tmp_path):
    """load_checkpoint: a missing, corrupt or foreign file is one line naming it and the fix;
    build_model gives back the saved CIRModel (architecture from the weights' shapes, WCB
    settings from args), same outputs."""
    torch.manual_seed(0)
    model = CIRModel(CLIP(**MICRO), n_maps=3, wcb_hidden=8).eval()
    with torch.no_grad():
        for head in (model.wcb_txt, model.wcb_ref, model.wcb_tar):
            head.alpha.fill_(0.5)
    args = dict(no_wcb=False, wcb_maps=3, wcb_hidden=8)
    util.atomic_write(tmp_path / "best.pt", dict(model=model.state_dict(), args=args))
    assert not (tmp_path / "best.pt.tmp").exists()
    again = runtime.build_model(runtime.load_checkpoint(tmp_path / "best.pt")).eval()
    text, images = tokenize(["make the circle red", "remove the square"]), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(text, images, images), again(text, images, images)):
            assert torch.equal(a, b)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save(model.clip.state_dict(), tmp_path / "clip.pt")
    for path, flag, msg in (
            (tmp_path / "nope.pt", "--resume", r"nope\.pt not found .*--resume runs/<run>/last.pt"),
            (tmp_path / "junk.pt", "--init", r"junk\.pt is not a readable checkpoint .*corrupt"),
            (tmp_path / "clip.pt", "--checkpoint", r"not a checkpoint of this project.*--clip")):
        with pytest.raises(SystemExit, match=msg) as e:
            runtime.load_checkpoint(path, flag)
        assert str(e.value).startswith("error: ") and "\n" not in str(e.value)

# ==================================================================================================
# util.py
# ==================================================================================================

def test_strict_json_and_error_line():
    """NaN and inf become null, so a strict JSON reader takes a log line; a loader worker's error
    comes back with its whole traceback, and error_line keeps its message only."""
    rec = util.strict_json(dict(a=[1.0, math.nan], b=(math.inf, "x"), c=dict(d=-math.inf, e=2)))
    assert rec == dict(a=[1.0, None], b=[None, "x"], c=dict(d=None, e=2))
    json.dumps(rec, allow_nan=False)
    worker = OSError("Caught OSError in DataLoader worker process 0.\n"
                     "Original Traceback (most recent call last):\n"
                     '  File "data.py", line 80, in load\n'
                     "OSError: cannot read image /x/a.png: truncated")
    assert util.error_line(worker) == "cannot read image /x/a.png: truncated"
    assert util.error_line(ValueError(" --noise 1.5: in [0, 1] ")) == "--noise 1.5: in [0, 1]"

# ==================================================================================================
# plots.py
# ==================================================================================================

def test_plots_are_pngs_of_their_layout(toy_root, tmp_path):
    """Each plot is a PNG of its figure's size at its dpi (width x height in inches x dpi); the
    loss histogram is not drawn when nothing was seen or no GMM was fitted."""
    losses, noisy = _bimodal(300, 0.3, 0)
    stats = NoiseFilter(300, warmup_epochs=0).update(losses, 0)
    plots.loss_histogram(losses, stats, tmp_path / "hist.png", 0, noisy)
    plots.loss_histogram(torch.full((300,), math.nan), stats, tmp_path / "unseen.png")
    plots.loss_histogram(losses, dict(stats, means=[math.nan, math.nan]), tmp_path / "nofit.png")
    history = [dict(epoch=e, metrics={"R@1": 10.0 + e, "Rsubset@1": 30.0 + e, "avg": 20.0})
               for e in range(3)]
    plots.recall_curves(history, tmp_path / "recall.png")
    img = sorted(toy_root.rglob("*.png"))[:5]
    plots.query_grid([(img[0], "make it red", [(img[1], False), (img[2], True)]),
                        (img[3], "remove the square", [(img[4], True)])], tmp_path / "grid.png")
    rows = [(img[k], f"edit {k}", img[k + 1], img[k + 2], f"#{k + 1}") for k in range(3)]
    plots.audit_sheet(rows, tmp_path / "sheet.png")
    sizes = {"hist": (660, 385), "recall": (924, 385), "grid": (540, 400), "sheet": (864, 200)}
    for name, size in sizes.items():
        with Image.open(tmp_path / f"{name}.png") as im:
            assert im.format == "PNG" and im.size == size, name
    assert not (tmp_path / "unseen.png").exists() and not (tmp_path / "nofit.png").exists()

# ==================================================================================================
# tools/ (roc.py, study.py, bench.py)
# ==================================================================================================

def test_e2e_roc_tool_thresholds_each_view_with_the_truth(audit_run, capsys):
    """python -m tools.roc: a view's threshold set on the clean pairs' losses flags that share of
    them, and the fields it flags are those a plain loop over the audit's own rows (audit.jsonl:
    each view's loss, the truth) finds; the decision is the audit's w < 0.5."""
    from tools import roc
    root, out, _ = audit_run
    flags, decision = roc.main([str(out), "--fpr", "0.05", "--data-root", str(root)])
    rows = sorted(_audit_rows(out), key=lambda r: r["index"])
    assert "the decision of query + text (w < 0.5)" in capsys.readouterr().out
    assert decision.tolist() == [r["w"] < 0.5 for r in rows]
    for (view, fpr), flagged in flags.items():
        clean = sorted(r["views"][view]["loss"] for r in rows if r["noise"] == "clean")
        thr = torch.quantile(torch.tensor(clean), 1 - fpr).item()
        assert flagged.tolist() == [r["views"][view]["loss"] > thr for r in rows]
        assert sum(f for f, r in zip(flagged.tolist(), rows)
                   if r["noise"] == "clean") == pytest.approx(fpr * len(clean), abs=1)

def test_e2e_study_grid_resumes_and_reports(toy_root, tmp_path):
    from tools import study
    argv = ["--noise", "0", "partial:0.4", "--methods", "infonce", "oracle", "ncl+spn",
            "--seeds", "0", "--epochs", "1", "--workers", "0", "--data-root", str(toy_root),
            "--out", str(tmp_path / "st")]
    study.main(argv)
    rows = [json.loads(line) for line in (tmp_path / "st/results.jsonl").read_text().splitlines()]
    # two at a time: in the order they finish
    cells = [(r["method"], r["kind"], r["ratio"]) for r in rows]
    assert sorted(cells[:3]) == [("infonce", "partial", 0.4), ("infonce", "shuffle", 0.0),
                                 ("oracle", "partial", 0.4)]
    # no oracle at 0%: the control
    assert cells[3:] == [("ncl+spn", "shuffle", 0.0), ("ncl+spn", "partial", 0.4)]
    assert (tmp_path / "st/ncl-n0-s0/best.pt").is_file()    # ncl+spn trained its stage-1 cell first
    oracle = json.loads((tmp_path / "st/oracle-partialn0.4-s0/args.json").read_text())
    assert oracle["oracle"] and oracle["no_nfb"] and oracle["noise_kind"] == "partial"
    table = (tmp_path / "st/results.md").read_text()
    assert "| 0% | infonce | 1 |" in table and "| 40% partial | oracle | 1 |" in table
    assert (tmp_path / "st/study.png").is_file()
    study.main(argv)                                          # finished cells are not trained again
    assert len((tmp_path / "st/results.jsonl").read_text().splitlines()) == 5
    # other settings never mix into one table
    with pytest.raises(ValueError, match="not .*'epochs': 2"):
        study.main([*argv, "--epochs", "2"])
    with pytest.raises(ValueError, match="noise-kind 'swap'"):
        study.main([*argv, "--noise", "swap:0.2"])
    # the ncl cell exists already (ncl+spn's stage 1): recording it trains nothing, and the report
    # gains the NFB's flags by edit type, the clean pairs' percentages computed from that cell's
    # soft labels
    study.main([*argv[:3], "--methods", "ncl", *argv[7:]])
    w = torch.load(tmp_path / "st/ncl-n0-s0/last.pt", weights_only=True)["nfb"]["weights"]
    ds = data.CIRR(toy_root, "train")
    move = [bool(f) for f, t, n in zip(w < 0.5, ds.triplets, ds.noisy)
            if toy.edit_type(t["text"]) == "move" and not n]
    rows = (tmp_path / "st/results.md").read_text().splitlines()
    # the edit-type table's row
    row = [line for line in rows if line.startswith("| 0% | ncl |")][-1]
    assert row.split(" | ")[7] == f"{100 * sum(move) / len(move):.1f}"

def test_e2e_bench_train_runs_on_the_training_api(toy_root, micro_clip, tmp_path, monkeypatch,
                                                  capsys):
    """bench.py train builds its run with runtime.settings / build and times train_epoch,
    the NFB's views and validation: on the shared toy and micro CLIP it prints its three tables,
    every time positive. (Its speed is measured by bench.py, never here: the matmul peak is a
    stand-in.)"""
    from tools import bench
    settings = runtime.settings
    ours = ["--data-root", str(toy_root), "--clip", str(micro_clip), "--batch-size", "32",
            "--workers", "0"]
    monkeypatch.setattr(runtime, "settings", lambda argv: settings([*argv, *ours]))
    monkeypatch.setattr(bench, "matmul_peak", lambda: 1e12)
    # its run folder
    monkeypatch.setattr(bench.tempfile, "mkdtemp", lambda prefix: str(tmp_path / prefix))
    bench.bench_train(SimpleNamespace(steps=2))
    out = capsys.readouterr().out
    titles = ("toy training step (batch 32", "the step's arithmetic", "what makes the step fast",
              "NFB per epoch (5 steps", "--encoder text", "memory for time: s/step at batch 32")
    for title in titles:
        assert title in out, title
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert float(rows["data"][1]) >= 0 and float(rows["step"][1]) > 0
    assert float(rows["total"][1]) > 0
    for views in ("query", "query + text", "query + text + change"):
        assert f"\n{views} " in out, views
