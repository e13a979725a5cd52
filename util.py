"""What every script shares, outside the paper: the one printer, one-line errors, atomic writes,
JSON lines, plots, a checked download. Every file may import this one; it imports none of them."""

import argparse
import hashlib
import json
import os
import urllib.request
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

_SAID = set()   # what this process has printed: log's once=

def log(msg, once=False):
    """Print on rank 0 only (torchrun's RANK), above the progress bars. once: not again what this
    process has printed already (a dataset is built several times, and says the same each time)."""
    if os.environ.get("RANK", "0") == "0" and not (once and msg in _SAID):
        _SAID.add(msg)
        tqdm.write(msg)

def atomic_write(path, obj):
    """Write a temp file in the same folder, then rename: a run killed mid-write leaves the old file
    intact (or none). obj: text (str), or anything torch.save takes (a checkpoint)."""
    tmp = Path(f"{path}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(obj) if isinstance(obj, str) else torch.save(obj, tmp)
    os.replace(tmp, path)

def strict_json(x):
    """NaN / inf -> null (a JSON round trip): every JSON reader (jq, pandas, JS) takes it."""
    return json.loads(json.dumps(x), parse_constant=lambda nan_or_inf: None)

def pyplot():
    """matplotlib on the Agg backend (no display on training machines), imported when a figure is
    drawn. A user's text may hold glyphs its font lacks (an emoji): boxes, and no warning each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from")
    return plt

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help says each flag's default (flags whose default is a preset's say so in their help)."""

    def _get_help_string(self, action):
        shown = action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
        return (action.help or "") + (" (default: %(default)s)" if shown else "")

class ArgumentParser(argparse.ArgumentParser):
    """argparse that says a bad flag in one line, `error: <flag and fix>`, not the usage block."""

    def __init__(self, description=None):
        super().__init__(description=description, formatter_class=HelpFormatter)

    def error(self, message):
        self.exit(2, f"error: {message}\n")

def error_line(e):
    """A bad-input error's message for the command line. One raised in a DataLoader worker comes
    back with the worker's whole traceback as its message: its last line is the original one."""
    msg = str(e).strip()
    if "Original Traceback" not in msg:
        return msg
    return msg.splitlines()[-1].removeprefix(type(e).__name__ + ": ")  # "OSError: cannot read ..."

# ------------------------------------------------------------------------------------------------
# a checked download (OpenAI's CLIP checkpoints)

def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

def download(url, root):
    """Fetch url into root (progress bar), checking the SHA-256 (the URL's folder); one retry."""
    sha, target = url.split("/")[-2], Path(root).expanduser() / url.split("/")[-1]
    if target.is_file():
        if _sha256(target) == sha:
            return target
        warnings.warn(f"{target}: cached file's SHA-256 mismatches; downloading it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    for attempt in range(2):
        try:
            with urllib.request.urlopen(url) as src, open(part, "wb") as dst:
                size = int(src.headers.get("Content-Length") or 0) or None   # None: unknown
                with tqdm(total=size, unit="B", unit_scale=True, desc=target.name) as bar:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        bar.update(dst.write(chunk))
        except OSError as e:                               # urllib's URLError is an OSError
            part.unlink(missing_ok=True)
            raise ConnectionError(f"could not download {url} ({e}). Without network, download it "
                                  f"by hand and put it at {target} (sha256 {sha}), or pass the "
                                  f"file's path instead of the name") from None
        if _sha256(part) == sha:
            return part.replace(target)
        warnings.warn(f"{target.name}: SHA-256 mismatch after download {attempt + 1} of 2")
    part.unlink(missing_ok=True)
    raise OSError(f"{url}: the downloaded file's SHA-256 does not match {sha} (twice); check the "
                  f"network/proxy, or download it by hand to {target}")
