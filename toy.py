"""The toy benchmark: a CSS-style composed-retrieval set of coloured shapes, generated from a seed and written in
CIRR's exact layout, so that the same CIRR loader, metrics and training loop run on it with a tiny CLIP trained from
scratch on a CPU. Its grammar is in make_toy's docstring; its own label noise keeps the ground truth ("noisy" in the
training captions) so the noise filter's detection can be scored; image_captions.json (name -> exact scene
caption) feeds SPN's positive generation (spn.py) without a captioner.
"""
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from triplets import Noise, inject_noise

TOY_SHAPES = ("circle", "square", "triangle")
TOY_COLORS = {"red": (220, 50, 50), "green": (50, 185, 70), "blue": (60, 95, 240), "yellow": (235, 215, 40),
              "purple": (160, 70, 215), "white": (235, 235, 235)}
TOY_SIZES = ("small", "large")
TOY_CELLS = ("top left", "top middle", "top right", "middle left", "center", "middle right", "bottom left",
             "bottom middle", "bottom right")
TOY_BACKGROUND = (40, 40, 40)
TOY_IMAGE_SIZE = 64
# the generator's sizes (make_toy's keywords) and their defaults
TOY = dict(n_train=6000,       # training triplets (1,200 groups, 7,200 images)
           n_val=1335,         # val queries (267 groups: a 1,602-image gallery)
           n_test=1335,        # test1 queries
           noise=0.0,          # fraction of training triplets whose target the generator replaces (truth kept)
           image_size=TOY_IMAGE_SIZE,
           max_objects=3,
           group_size=6)       # subset members per group: the base scene + 5 one-edit neighbours
TOY_VERSION = 1            # bump when the generator's output changes: ensure_toy then regenerates
TOY_ROOT = Path(__file__).resolve().parent / "data" / "toy"  # data/ is git-ignored


def default_toy_root():
    return TOY_ROOT


def _refer(scene, obj):
    """Shortest unambiguous name of obj within scene (see the grammar)."""
    shape, color, size, cell = obj
    for keys, words in (((0,), (shape,)), ((0, 1), (color, shape)), ((0, 1, 2), (size, color, shape))):
        if sum(all(o[k] == obj[k] for k in keys) for o in scene) == 1:
            return " ".join(words)
    return f"{color} {shape} at the {TOY_CELLS[cell]}"


def _replace(scene, old, new):
    return tuple(sorted([o for o in scene if o != old] + ([new] if new is not None else []), key=lambda o: o[3]))


def _random_edit(rng, scene, max_objects):
    """One random edit of scene -> (text, new scene)."""
    free = [c for c in range(len(TOY_CELLS)) if all(o[3] != c for o in scene)]
    ops = ["color", "size", "shape", "move"] + (["add"] if len(scene) < max_objects else []) \
        + (["remove"] if len(scene) > 1 else [])
    op = rng.choice(ops)
    if op == "add":
        new = (rng.choice(TOY_SHAPES), rng.choice(list(TOY_COLORS)), rng.choice(TOY_SIZES), rng.choice(free))
        verb = rng.choice(("add", "put"))
        return f"{verb} a {new[2]} {new[1]} {new[0]} at the {TOY_CELLS[new[3]]}", _replace(scene, None, new)
    obj = rng.choice(scene)
    shape, color, size, cell = obj
    ref = _refer(scene, obj)
    if op == "color":
        c = rng.choice([c for c in TOY_COLORS if c != color])
        text = rng.choice((f"make the {ref} {c}", f"paint the {ref} {c}"))
        return text, _replace(scene, obj, (shape, c, size, cell))
    if op == "size":
        s = "large" if size == "small" else "small"
        text = rng.choice((f"make the {ref} {'bigger' if s == 'large' else 'smaller'}",
                           f"{'enlarge' if s == 'large' else 'shrink'} the {ref}"))
        return text, _replace(scene, obj, (shape, color, s, cell))
    if op == "shape":
        sh = rng.choice([s for s in TOY_SHAPES if s != shape])
        text = rng.choice((f"turn the {ref} into a {sh}", f"make the {ref} a {sh}"))
        return text, _replace(scene, obj, (sh, color, size, cell))
    if op == "remove":
        return rng.choice((f"remove the {ref}", f"take away the {ref}")), _replace(scene, obj, None)
    c = rng.choice(free)  # move
    text = rng.choice((f"move the {ref} to the {TOY_CELLS[c]}", f"shift the {ref} to the {TOY_CELLS[c]}"))
    return text, _replace(scene, obj, (shape, color, size, c))


def edit_type(text):
    """The kind of edit a toy modification text asks for: 'color', 'size', 'shape', 'add', 'remove' or 'move' (the
    grammar in make_toy's docstring). Used to break the noise filter's decisions down by edit."""
    words = text.split()
    simple = {"add": "add", "put": "add", "remove": "remove", "take": "remove", "move": "move", "shift": "move",
              "paint": "color", "turn": "shape", "enlarge": "size", "shrink": "size"}
    if words[0] in simple:
        return simple[words[0]]
    # "make the <ref> bigger | <colour> | a <shape>"
    if words[-1] in ("bigger", "smaller"):
        return "size"
    if words[-1] in TOY_SHAPES and words[-2] == "a":
        return "shape"
    if words[-1] in TOY_COLORS:
        return "color"
    raise ValueError(f"not a toy modification text: {text!r}")


def _random_scene(rng, max_objects):
    cells = sorted(rng.sample(range(len(TOY_CELLS)), rng.randint(1, max_objects)))
    return tuple((rng.choice(TOY_SHAPES), rng.choice(list(TOY_COLORS)), rng.choice(TOY_SIZES), c) for c in cells)


def scene_caption(scene):
    """Exact caption of a scene: "a large red circle at the top left and a small blue square at the center"."""
    return " and ".join(f"a {size} {color} {shape} at the {TOY_CELLS[cell]}" for shape, color, size, cell in scene)


def draw_scene(scene, size=TOY_IMAGE_SIZE):
    """PIL image of a scene: each object centred in its grid cell, large = 80% of the cell, small = 44%."""
    im = Image.new("RGB", (size, size), TOY_BACKGROUND)
    d = ImageDraw.Draw(im)
    cw = size / 3
    for shape, color, sz, cell in scene:
        cx, cy = (cell % 3 + 0.5) * cw, (cell // 3 + 0.5) * cw
        r = cw * (0.40 if sz == "large" else 0.22)
        fill = TOY_COLORS[color]
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            q = r * 0.85  # a slightly smaller square has about the circle's area: size is not read off the corners
            d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return im


def _make_groups(rng, n_groups, group_size, max_objects, used):
    """n_groups of (base scene, [(text, scene)] * (group_size - 1)); every scene new to `used` (updated)."""
    groups = []
    for _ in range(n_groups):
        for _attempt in range(1000):
            base = _random_scene(rng, max_objects)
            if base in used:
                continue
            edits, seen = [], {base}
            for _try in range(20 * group_size):
                text, s = _random_edit(rng, base, max_objects)
                if s not in used and s not in seen:
                    seen.add(s)
                    edits.append((text, s))
                    if len(edits) == group_size - 1:
                        break
            if len(edits) == group_size - 1:
                used.update(seen)
                groups.append((base, edits))
                break
        else:
            raise ValueError("make_toy: ran out of distinct scenes; ask for fewer triplets or allow more objects")
    return groups


def make_toy(root, seed=0, **sizes):
    """Write the toy benchmark into `root` in CIRR's layout; deterministic from `seed` and `sizes` (TOY's keywords:
    same arguments -> byte-identical files). n_*: number of triplets (queries) per split; noise: fraction of training
    triplets whose target is replaced by a random other training image (ground truth kept). Returns Path(root).

    A CSS-style (Vo et al., 2019) composed-retrieval set: a scene is 1-3 objects on a 3x3 grid, each object a
    (shape, colour, size, cell) with shape in {circle, square, triangle}, colour in {red, green, blue, yellow, purple,
    white}, size in {small, large}, at most one object per cell. Images are drawn on a dark 64 px canvas.

    Modification-text grammar (one edit per text; <ref> is the shortest unambiguous name of an object in the
    reference scene: "<shape>", else "<colour> <shape>", else "<size> <colour> <shape>", else
    "<colour> <shape> at the <cell>"):
        change colour:  "make the <ref> <colour>"          | "paint the <ref> <colour>"
        change size:    "make the <ref> bigger|smaller"    | "enlarge|shrink the <ref>"
        change shape:   "turn the <ref> into a <shape>"    | "make the <ref> a <shape>"
        add an object:  "add a <size> <colour> <shape> at the <cell>" | "put a <size> <colour> <shape> at the <cell>"
        remove:         "remove the <ref>"                 | "take away the <ref>"
        move:           "move the <ref> to the <cell>"     | "shift the <ref> to the <cell>"
    <cell> is one of: top left, top middle, top right, middle left, center, middle right, bottom left,
    bottom middle, bottom right. Colour, shape and size changes keep everything else; "add" and "move" use an empty
    cell; "remove" keeps at least one object, "add" at most max_objects (3).

    Structure: every group is a base scene and 5 scenes one edit away from it (6 members: Recall_subset's subset);
    each of the 5 gives a triplet (base, edit text, edited scene). Every scene occurs once in the whole data set, so
    train / val / test1 share no image and no query. Files, in CIRR's layout under the root:
        captions/cap.rc2.{train,val,test1}.json   (test1 without targets, as CIRR; train rows carry "noisy", and
                                                   "target_clean" where the toy's own noise replaced the target)
        image_splits/split.rc2.{split}.json        {name: "./train/<g // 100>/<name>.png" | "./dev/..." | "./test1/..."}
        train/, dev/, test1/                        the PNG images
        image_captions.json                         {name: exact caption of the scene}, e.g. "a large red circle at
                                                    the top left and a small blue square at the center"
        scenes.json                                 {name: [{shape, color, size, cell}, ...]} (objects in cell order)
        toy_test1_targets.json                      {pairid: target} (the toy's test answers, absent from CIRR)
        toy_params.json                             the generator's parameters (written last: marks a complete set)
    """
    params = _toy_params(seed, sizes)
    n_train, n_val, n_test, noise, image_size, max_objects, group_size = (params[k] for k in TOY)
    if not 1 <= max_objects <= len(TOY_CELLS) or group_size < 2:
        raise ValueError("make_toy: need 1 <= max_objects <= 9 and group_size >= 2")
    root = Path(root)
    rng = random.Random(seed)
    used = set()
    pairid = 0
    all_scenes, all_captions, test_targets = {}, {}, {}
    for split, n, prefix in (("train", n_train, "train"), ("val", n_val, "dev"), ("test1", n_test, "test1")):
        per = group_size - 1
        groups = _make_groups(rng, math.ceil(n / per), group_size, max_objects, used)
        split_file, rows = {}, []
        for g, (base, edits) in enumerate(groups):
            names = [f"{prefix}-{g}-{k}" for k in range(group_size)]
            for name, scene in zip(names, [base] + [s for _, s in edits]):
                sub = f"{g // 100}/" if split == "train" else ""  # CIRR's train split nests images in folders
                split_file[name] = f"./{prefix}/{sub}{name}.png"
                all_scenes[name] = scene
            members = names[:]
            rng.shuffle(members)
            for k, (text, _) in enumerate(edits[:n - g * per], start=1):
                row = dict(pairid=pairid, reference=names[0], target_hard=names[k], target_soft={names[k]: 1.0},
                           caption=text, img_set=dict(id=g, members=members,
                                                      reference_rank=members.index(names[0]),
                                                      target_rank=members.index(names[k])))
                if split == "test1":  # CIRR's test format: no targets; the toy keeps its answers aside
                    test_targets[str(pairid)] = names[k]
                    row = dict(pairid=pairid, reference=names[0], caption=text,
                               img_set=dict(id=g, members=members, reference_rank=members.index(names[0])))
                rows.append(row)
                pairid += 1
        if split == "train":
            trip = [dict(reference=r["reference"], target=r["target_hard"]) for r in rows]
            new, flags = inject_noise(trip, list(split_file), Noise(noise, "target", seed + 1_000_003))
            for r, t, f in zip(rows, new, flags.tolist()):
                if f:
                    r["target_clean"] = r["target_hard"]
                    r["target_hard"], r["target_soft"] = t["target"], {t["target"]: 1.0}
                r["noisy"] = f
        _write_json(root / f"captions/cap.rc2.{split}.json", rows)
        _write_json(root / f"image_splits/split.rc2.{split}.json", split_file)
        for name, rel in split_file.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            draw_scene(all_scenes[name], image_size).save(p, format="PNG")
            all_captions[name] = scene_caption(all_scenes[name])
    _write_json(root / "image_captions.json", all_captions)
    _write_json(root / "scenes.json", {n: [dict(shape=o[0], color=o[1], size=o[2], cell=TOY_CELLS[o[3]]) for o in s]
                                       for n, s in all_scenes.items()})
    _write_json(root / "toy_test1_targets.json", test_targets)
    _write_json(root / "toy_params.json", params)
    return root


def _toy_params(seed, sizes):
    """The generator's parameters (what toy_params.json records): TOY with `sizes` given."""
    unknown = set(sizes) - set(TOY)
    if unknown:
        raise ValueError(f"make_toy: unknown sizes {sorted(unknown)}; the toy's are {', '.join(TOY)}")
    return dict(version=TOY_VERSION, seed=seed, **{**TOY, **sizes})


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def ensure_toy(root=None, seed=0, **sizes):
    """The toy benchmark at `root` (default: default_toy_root()), generated only if missing or made with other
    parameters. Generation goes to a temporary sibling folder renamed into place, so a crash leaves no half set.
    Refuses to replace a non-empty folder that is not a toy set. Returns the Path."""
    root = Path(root) if root is not None else default_toy_root()
    params = _toy_params(seed, sizes)
    marker = root / "toy_params.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                return root
        except json.JSONDecodeError:
            pass
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(f"ensure_toy: {root} exists, is not empty and holds no toy_params.json; "
                              f"choose another --data-root or empty it")
    t = time.perf_counter()
    print(f"toy benchmark: generating in {root} ({params})", flush=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_toy(tmp, seed, **sizes)
    if root.exists():
        shutil.rmtree(root)  # an older toy set (its marker was checked above)
    os.replace(tmp, root)
    print(f"toy benchmark: done in {time.perf_counter() - t:.1f} s", flush=True)
    return root


def with_answers(ds, root):
    """The toy's test1 split (a CIRR dataset) with its answers as targets, from toy_test1_targets.json (CIRR's test
    file format has none), so that evaluate.py scores it like val. -> ds, changed in place."""
    answers = json.loads((Path(root) / "toy_test1_targets.json").read_text())
    ds.triplets = [{**t, "target": answers[str(t["pairid"])]} for t in ds.triplets]
    ds.tgt_idx = torch.tensor([ds.index[t["target"]] for t in ds.triplets], dtype=torch.long)
    return ds


def toy_root(root=None):
    """The toy folder a command works on: the default one (data/toy) is generated or refreshed by ensure_toy; a
    folder the user names is taken as it is when it already holds a toy set (its own sizes), else generated."""
    if root is None:
        return ensure_toy()
    root = Path(root)
    return root if (root / "toy_params.json").is_file() else ensure_toy(root)
