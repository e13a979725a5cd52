"""The toy benchmark: a CSS-style (Vo et al., 2019) set of coloured shapes made from a seed in
CIRR's exact layout, so that CIRR's loader, metrics and training run on it with a tiny CLIP trained
from scratch on a CPU. A scene: 1-3 objects (shape, colour, size, cell) on a 3x3 grid, one a cell
at most. A group: a base scene and 5 scenes one edit away (Recall_subset's subset), each a triplet
(base, edit text, edited scene); no scene occurs twice: the splits share no image or query. Beside
CIRR's files (test1 without targets; train rows with "noisy", the truth, and "target_clean"):
    image_captions.json     {name: exact scene caption}: SPN's positives (spn.py) need no captioner
    scenes.json             {name: [{shape, color, size, cell}, ...]} (objects in cell order)
    toy_test1_targets.json  {pairid: target}: the test answers, which CIRR keeps private
    toy_params.json         the generator's parameters, written last: marks a complete set"""
import json
import os
import random
import shutil
import time
from contextlib import suppress
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from triplets import Noise, inject_noise

TOY_SHAPES = ("circle", "square", "triangle")
TOY_COLORS = {"red": (220, 50, 50), "green": (50, 185, 70), "blue": (60, 95, 240),
              "yellow": (235, 215, 40), "purple": (160, 70, 215), "white": (235, 235, 235)}
TOY_SIZES = ("small", "large")
TOY_CELLS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom middle", "bottom right")
TOY_BACKGROUND = (40, 40, 40)
TOY_IMAGE_SIZE = 64
# make_toy's keywords and defaults: 6,000 training triplets (1,200 groups, 7,200 images), 1,335 val
# and test1 queries each (267 groups: a 1,602-image gallery); group_size: a base + 5 neighbours
TOY = dict(n_train=6000, n_val=1335, n_test=1335, noise=0.0, image_size=TOY_IMAGE_SIZE,
           max_objects=3, group_size=6)
# the texts, two phrasings an edit (one drawn), other properties kept; {ref}: _refer's name of the
# object; add and move: to an empty cell; size: {more} is bigger|smaller, {grow} enlarge|shrink
TOY_TEXTS = dict(color=("make the {ref} {color}", "paint the {ref} {color}"),
                 size=("make the {ref} {more}", "{grow} the {ref}"),
                 shape=("turn the {ref} into a {shape}", "make the {ref} a {shape}"),
                 add=("add {what}", "put {what}"),  # "a <size> <colour> <shape> at the <cell>"
                 remove=("remove the {ref}", "take away the {ref}"),  # one object stays
                 move=("move the {ref} to the {cell}", "shift the {ref} to the {cell}"))
TOY_VERSION = 1            # bump when the generator's output changes: ensure_toy then regenerates

def default_toy_root():
    return Path(__file__).resolve().parent / "data" / "toy"  # data/ is git-ignored

def make_toy(root, seed=0, **sizes):
    """Write the toy into `root` from `seed` and `sizes` (TOY's keywords; noise: the share of
    training targets replaced by another training image, truth kept; texts: TOY_TEXTS, one edit
    each): same arguments, byte-identical files. -> Path(root)"""
    params, root = _toy_params(seed, sizes), Path(root)
    n_train, n_val, n_test, noise, image_size, max_objects, group_size = (params[k] for k in TOY)
    if not 1 <= max_objects <= len(TOY_CELLS) or group_size < 2:
        raise ValueError("make_toy: need 1 <= max_objects <= 9 and group_size >= 2")
    rng, used, pairid, all_scenes, test_targets = random.Random(seed), set(), 0, {}, {}
    for split, n in (("train", n_train), ("val", n_val), ("test1", n_test)):
        prefix, split_file, rows = "dev" if split == "val" else split, {}, []
        groups = [_group(rng, group_size, max_objects, used) for _ in range(0, n, group_size - 1)]
        for g, (base, edits) in enumerate(groups):
            names = [f"{prefix}-{g}-{k}" for k in range(group_size)]
            sub = f"{g // 100}/" if split == "train" else ""  # CIRR nests train images in folders
            for name, scene in zip(names, [base] + [s for _, s in edits]):
                split_file[name], all_scenes[name] = f"./{prefix}/{sub}{name}.png", scene
            members = names[:]
            rng.shuffle(members)
            img_set = dict(id=g, members=members, reference_rank=members.index(names[0]))
            for k, (text, _) in enumerate(edits[:n - g * (group_size - 1)], start=1):
                row = dict(pairid=pairid, reference=names[0], target_hard=names[k],
                           target_soft={names[k]: 1.0}, caption=text,
                           img_set={**img_set, "target_rank": members.index(names[k])})
                if split == "test1":  # CIRR's test format has no targets: keep the answers aside
                    test_targets[str(pairid)] = names[k]
                    row = dict(pairid=pairid, reference=names[0], caption=text, img_set=img_set)
                rows.append(row)
                pairid += 1
        if split == "train":
            trip = [dict(reference=r["reference"], target=r["target_hard"]) for r in rows]
            new, noisy = inject_noise(trip, [*split_file], Noise(noise, "target", seed + 1_000_003))
            for r, t, f in zip(rows, new, noisy.tolist()):  # the truth kept: target_clean
                r.update(dict(target_clean=r["target_hard"], target_hard=t["target"],
                              target_soft={t["target"]: 1.0}) if f else {}, noisy=f)
        _write_json(root / f"captions/cap.rc2.{split}.json", rows)
        _write_json(root / f"image_splits/split.rc2.{split}.json", split_file)
        for name, rel in split_file.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            draw_scene(all_scenes[name], image_size).save(root / rel, format="PNG")
    _write_json(root / "image_captions.json", {n: scene_caption(s) for n, s in all_scenes.items()})
    _write_json(root / "scenes.json", {n: [dict(shape=sh, color=c, size=sz, cell=TOY_CELLS[i])
                                           for sh, c, sz, i in s] for n, s in all_scenes.items()})
    _write_json(root / "toy_test1_targets.json", test_targets)
    _write_json(root / "toy_params.json", params)
    return root

def edit_type(text):
    """A toy text's edit: 'color', 'size', 'shape', 'add', 'remove' or 'move' (audit groups)."""
    words = text.split()
    first = dict(add="add", put="add", remove="remove", take="remove", move="move", shift="move",
                 paint="color", turn="shape", enlarge="size", shrink="size")
    last = dict(bigger="size", smaller="size", **dict.fromkeys(TOY_COLORS, "color"),
                **dict.fromkeys(TOY_SHAPES, "shape" if words[-2:-1] == ["a"] else None))
    if kind := first.get(words[0]) or last.get(words[-1]):  # else "make the <ref> <last>"
        return kind
    raise ValueError(f"not a toy modification text: {text!r}")

def scene_caption(scene):
    """Exact caption: "a large red circle at the top left and a small blue square at the center"."""
    return " and ".join(f"a {size} {color} {shape} at the {TOY_CELLS[cell]}"
                        for shape, color, size, cell in scene)

def draw_scene(scene, size=TOY_IMAGE_SIZE):
    """PIL image of a scene: objects centred in their cells, large = 80% of a cell, small = 44%."""
    im = Image.new("RGB", (size, size), TOY_BACKGROUND)
    d, cw = ImageDraw.Draw(im), size / 3
    for shape, color, sz, cell in scene:
        cx, cy = (cell % 3 + 0.5) * cw, (cell // 3 + 0.5) * cw
        r, fill = cw * (0.40 if sz == "large" else 0.22), TOY_COLORS[color]
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":  # about the circle's area: size is not read off the corners
            d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return im

def ensure_toy(root=None, seed=0, **sizes):
    """The toy at `root` (default: default_toy_root()) -> Path, generated if missing or made with
    other parameters, in a sibling folder renamed into place (a crash leaves no half set); a
    non-empty folder without toy_params.json is refused."""
    root = Path(root) if root is not None else default_toy_root()
    params, marker = _toy_params(seed, sizes), root / "toy_params.json"
    if marker.is_file():
        with suppress(json.JSONDecodeError):  # a broken marker: generate again
            if json.loads(marker.read_text()) == params:
                return root
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(f"ensure_toy: {root} exists, is not empty and holds no "
                              f"toy_params.json; choose another --data-root or empty it")
    t, tmp = time.perf_counter(), root.parent / f".{root.name}.tmp-{os.getpid()}"
    print(f"toy benchmark: generating in {root} ({params})", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    make_toy(tmp, seed, **sizes)
    if root.exists():
        shutil.rmtree(root)  # an older toy set (its marker was checked above)
    os.replace(tmp, root)
    print(f"toy benchmark: done in {time.perf_counter() - t:.1f} s", flush=True)
    return root

def with_answers(ds, root):
    """test1 (CIRR's) given toy_test1_targets.json's answers, for evaluate.py to score like val."""
    answers = json.loads((Path(root) / "toy_test1_targets.json").read_text())
    ds.triplets = [{**t, "target": answers[str(t["pairid"])]} for t in ds.triplets]
    ds.tgt_idx = torch.tensor([ds.index[t["target"]] for t in ds.triplets], dtype=torch.long)
    return ds

def toy_root(root=None):
    """The toy folder a command works on: the default (data/toy) is generated or refreshed by
    ensure_toy; a folder the user names is taken as it is if it holds a toy set, else generated."""
    if root is not None and (Path(root) / "toy_params.json").is_file():
        return Path(root)
    return ensure_toy(root)

def _toy_params(seed, sizes):
    """The generator's parameters (what toy_params.json records): TOY with `sizes` given."""
    if unknown := set(sizes) - set(TOY):
        raise ValueError(f"make_toy: unknown sizes {sorted(unknown)}; "
                         f"the toy's are {', '.join(TOY)}")
    return dict(version=TOY_VERSION, seed=seed, **{**TOY, **sizes})

def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))

def _group(rng, group_size, max_objects, used):
    """(base scene, [(text, scene)] * (group_size - 1)), every scene new to `used` (updated). A base
    gets 20 * group_size tries at distinct edits, or is drawn again."""
    for _attempt in range(1000):
        cells = sorted(rng.sample(range(len(TOY_CELLS)), rng.randint(1, max_objects)))
        base = tuple((rng.choice(TOY_SHAPES), rng.choice(list(TOY_COLORS)),
                      rng.choice(TOY_SIZES), c) for c in cells)
        if base in used:
            continue
        edits = {}                                      # {scene: text}, in the order drawn
        for _try in range(20 * group_size):
            text, s = _random_edit(rng, base, max_objects)
            if s not in used and s != base:
                edits.setdefault(s, text)
            if len(edits) == group_size - 1:
                used.update([base, *edits])
                return base, [(text, s) for s, text in edits.items()]
    raise ValueError("make_toy: ran out of distinct scenes; ask for fewer triplets or allow more "
                     "objects")

def _random_edit(rng, scene, max_objects):
    """One random edit of scene -> (text, new scene, its objects in cell order). The order of the
    draws (the text last) fixes the random stream, hence every toy file."""
    free = [c for c in range(len(TOY_CELLS)) if all(o[3] != c for o in scene)]
    op = rng.choice(["color", "size", "shape", "move"] + ["add"] * (len(scene) < max_objects)
                    + ["remove"] * (len(scene) > 1))
    obj = new = None  # the object edited (none: add) and what replaces it (none: remove)
    if op == "add":
        new = (rng.choice(TOY_SHAPES), rng.choice(list(TOY_COLORS)), rng.choice(TOY_SIZES),
               rng.choice(free))
    else:
        obj = rng.choice(scene)
        shape, color, size, cell = obj
    if op == "color":
        new = (shape, rng.choice([c for c in TOY_COLORS if c != color]), size, cell)
    elif op == "size":
        new = (shape, color, "large" if size == "small" else "small", cell)
    elif op == "shape":
        new = (rng.choice([s for s in TOY_SHAPES if s != shape]), color, size, cell)
    elif op == "move":
        new = (shape, color, size, rng.choice(free))
    shape, color, size, cell = new or obj
    more, grow = ("bigger", "enlarge") if size == "large" else ("smaller", "shrink")  # size's words
    text = rng.choice(TOY_TEXTS[op]).format(
        ref=obj and _refer(scene, obj), what=new and scene_caption([new]), shape=shape, color=color,
        cell=TOY_CELLS[cell], more=more, grow=grow)
    rest = [o for o in scene if o != obj] + ([new] if new else [])
    return text, tuple(sorted(rest, key=lambda o: o[3]))

def _refer(scene, obj):
    """Shortest unambiguous name of obj within scene (TOY_TEXTS' {ref})."""
    shape, color, size, cell = obj
    for n, words in ((1, (shape,)), (2, (color, shape)), (3, (size, color, shape))):
        if sum(o[:n] == obj[:n] for o in scene) == 1:  # no other object shares its first n fields
            return " ".join(words)
    return f"{color} {shape} at the {TOY_CELLS[cell]}"
