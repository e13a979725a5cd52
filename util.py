"""What every script shares, outside the paper: the one printer, one-line errors, atomic writes, JSON lines, plots.

Every other file may import this one; it imports none of them.
"""

import argparse
import math
import os
from pathlib import Path

import torch
from tqdm import tqdm

_SAID = set()


def log(msg, once=False):
    """Print on rank 0 only (torchrun's RANK), above the progress bars. once: a message a process has printed
    already is not printed again (a dataset is built several times, and says the same each time)."""
    if os.environ.get("RANK", "0") != "0" or once and msg in _SAID:
        return
    _SAID.add(msg)
    tqdm.write(msg)


def atomic_write(path, obj):
    """Write to a temp file in the same folder, then rename: a run killed mid-write leaves the old file intact (or
    none). obj: text (str), or anything torch.save takes (a checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(obj, str):
        tmp.write_text(obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def strict_json(x):
    """NaN / inf -> null, so that every JSON reader (jq, pandas, JavaScript) takes the log lines."""
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def pyplot():
    """matplotlib on the Agg backend (no display on training machines), imported when a figure is drawn. A
    user's text may hold characters its font lacks (an emoji): drawn as boxes, without a warning per glyph."""
    import warnings
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from")
    return plt


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help says each flag's default (flags whose default is a preset's say so in their own help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings and \
                "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, `error: <flag and fix>`, instead of the usage block."""

    def __init__(self, description):
        super().__init__(description=description, formatter_class=HelpFormatter)

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def error_line(e):
    """The message of a bad-input error for the command line. An error raised in a DataLoader worker comes back
    with the worker's whole traceback as its message: its last line is the original message."""
    msg = str(e).strip()
    if "Original Traceback" not in msg:
        return msg
    last = msg.splitlines()[-1]                      # "OSError: cannot read image ..."
    return last.split(": ", 1)[1] if last.startswith(type(e).__name__ + ": ") else last
