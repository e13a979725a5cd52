"""What to run first on a CUDA machine: one command, at most 8 minutes on one GPU, one JSON report.

    python -m tools.gpu_check                        # writes gpu_check.json, prints a summary
    python -m tools.gpu_check --out X.json --parts archs     # one part again

  tests  test_all.py's CUDA tests (pytest -k cuda, a subprocess): each test's outcome and message
  toy    the toy's default run, `python train.py`, on the GPU, and the same command on the CPU at
         once in the background (CUDA_VISIBLE_DEVICES=, 8 threads): wall time and the R@1 of
         each run's best epoch
  archs  a few training steps of ViT-B/32, RN50x4 and ViT-L/14 with random weights (nothing is
         downloaded) at batch 128 on placeholder images in CIRR's layout, plain and with
         --micro-batch 32 --grad-checkpoint: s/step, images/s, peak GPU memory against
         tools.memory's computed estimate for the same flags
Each part is timed and recorded even when it fails (its error line), and the report is written
after each part: a check killed half-way keeps what it measured. Without CUDA: one line, exit 2.
"""

import argparse
import contextlib
import gc
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from tools.memory import ARCHS, estimate, every_image_distinct

REPO = Path(__file__).resolve().parent.parent
BUDGET = 480                 # seconds for the whole check (8 minutes)
PARTS = ("tests", "toy", "archs")
MODELS = ("ViT-B/32", "RN50x4", "ViT-L/14")
MEMORY_FLAGS = ((), ("--micro-batch", "32", "--grad-checkpoint"))   # each model both ways
BATCH, WARM, STEPS = 128, 2, 5           # triplets per step; untimed, timed steps per model
CPU_THREADS = 8                          # the CPU run's, beside the GPU's work on 16 cores
_T0 = time.perf_counter()

def say(msg):
    """A progress line, with the seconds since the start."""
    print(f"[{time.perf_counter() - _T0:4.0f} s] {msg}", flush=True)

def left(deadline):
    return deadline - time.perf_counter()

# -----------------------------------------------------------------------------
# a. the CUDA tests

def cuda_tests(tmp, timeout, tests="test_all.py"):
    """pytest -k cuda in a subprocess -> {test: {outcome, message, seconds}}, counts."""
    xml = tmp / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", tests, "-k", "cuda", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    code, out = run_command(cmd, tmp / "tests.log", timeout)
    if code is None:
        return dict(ok=False, error=f"pytest timed out after {timeout:.0f} s", output_tail=out)
    found = junit(xml) if xml.is_file() else {}
    counts = Counter(r["outcome"] for r in found.values())
    rec = dict(ok=code == 0 and bool(found) and not counts["failed"], returncode=code,
               counts=dict(counts), tests=found)
    if not found:
        rec["error"] = "no test of test_all.py matched -k cuda"
    if not rec["ok"]:
        rec["output_tail"] = out
    return rec

def junit(path):
    """pytest's JUnit XML -> {test name: {outcome: passed|failed|skipped, message, seconds}}."""
    found = {}
    for case in ET.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped") and outcome != "failed":
                outcome = "skipped" if child.tag == "skipped" else "failed"
                text = (child.get("message") or child.text or "").strip()
                message = " | ".join(text.splitlines()[:3])[:400]
        found[case.get("name")] = dict(outcome=outcome, message=message,
                                       seconds=round(float(case.get("time") or 0), 1))
    return found

def run_command(cmd, log, timeout, env=None):
    """cmd in its own process group, output to the file log -> (exit code or None on timeout,
    the output's last lines). A timeout ends the group (train.py's loader workers too)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        code = proc.wait(timeout=max(1, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    return code, tail(log)

def tail(path, n=15):
    """The last n non-empty lines of a log (progress bars' carriage returns split, lines cut)."""
    lines = Path(path).read_text(errors="replace").replace("\r", "\n").splitlines()
    return [line[-200:] for line in lines if line.strip()][-n:]

# -----------------------------------------------------------------------------
# b. the toy's default run, GPU against CPU

def start_cpu_toy(tmp, extra=()):
    """`python train.py` on the CPU in the background -> {proc, threads, start, end (set by a
    thread waiting for it)}. The toy set is generated here first: two runs generating data/toy at
    once would race."""
    import toy
    with contextlib.redirect_stdout(io.StringIO()):
        toy.toy_root(None)
    threads = min(CPU_THREADS, max(1, (os.cpu_count() or 2) // 2))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    say(f"toy: the CPU run starts in the background ({threads} threads)")
    with open(tmp / "toy-cpu.log", "w") as f:
        proc = subprocess.Popen([sys.executable, "train.py", "--out", str(tmp / "toy-cpu"),
                                 *extra], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    run = dict(proc=proc, threads=threads, start=time.perf_counter())
    def waiter():                      # its end, while this process does the other parts
        proc.wait()
        run["end"] = time.perf_counter()
    run["waiter"] = threading.Thread(target=waiter, daemon=True)
    run["waiter"].start()
    return run

def toy_gpu(tmp, timeout, extra=()):
    """`python train.py` on the GPU, in the foreground: nothing else on the GPU meanwhile."""
    t = time.perf_counter()
    cmd = [sys.executable, "train.py", "--out", str(tmp / "toy-gpu"), *extra]
    code, out = run_command(cmd, tmp / "toy-gpu.log", timeout)
    return toy_result(tmp / "toy-gpu", code, time.perf_counter() - t, out)

def toy_cpu(tmp, run, timeout):
    """The background CPU run, waited for until the budget ends (then stopped)."""
    run["waiter"].join(max(1, timeout))
    code = None if run["waiter"].is_alive() else run["proc"].returncode
    if code is None:
        os.killpg(run["proc"].pid, signal.SIGKILL)
        run["waiter"].join()
    return dict(toy_result(tmp / "toy-cpu", code, run["end"] - run["start"],
                           tail(tmp / "toy-cpu.log")), threads=run["threads"])

def toy_result(out, code, seconds, output):
    """A run's exit, wall time and its best epoch (log.jsonl's score) with that epoch's R@1."""
    log = out / "log.jsonl"
    recs = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    rec = dict(ok=code == 0 and bool(recs), returncode=code, wall_s=round(seconds, 1),
               epochs=len(recs))
    if recs:
        best = max(recs, key=lambda r: r["score"])
        epochs_s = round(sum(r["time_epoch"] for r in recs), 1)
        rec.update({"best_epoch": best["epoch"], "R@1": best["metrics"]["R@1"],
                    "score": best["score"], "epochs_s": epochs_s})
    if code is None:
        rec["error"] = f"stopped at the time budget, {seconds:.0f} s in ({len(recs)} epochs)"
    if not rec["ok"]:
        rec["output_tail"] = output
    return rec

# -----------------------------------------------------------------------------
# c. real architectures: a few steps each, time and memory

def placeholder_cirr(root, rows_needed):
    """CIRR's official layout from testdata/cirr: its val split, and its val rows as a training
    split (repeated to rows_needed; CIRR's nested train/<k>/ folders); one 4x4 PNG hard-linked
    under every name."""
    from PIL import Image
    src = REPO / "testdata" / "cirr"
    rows = json.loads((src / "captions/cap.rc2.val.json").read_text())
    val = json.loads((src / "image_splits/split.rc2.val.json").read_text())
    names = sorted({n for r in rows
                    for n in (r["reference"], r["target_hard"], *r["img_set"]["members"])})
    train = {n: f"./train/{k % 7}/{n}.png" for k, n in enumerate(names)}
    files = {"captions/cap.rc2.val.json": rows, "image_splits/split.rc2.val.json": val,
             "captions/cap.rc2.train.json": rows * -(-rows_needed // len(rows)),
             "image_splits/split.rc2.train.json": train}
    for rel, obj in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(obj))
    png = root / "placeholder.png"
    Image.new("RGB", (4, 4), (200, 10, 10)).save(png)
    for rel in {*val.values(), *train.values()}:
        (root / "img_raw" / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(png, root / "img_raw" / rel)
        except OSError:                         # a file system without hard links
            shutil.copyfile(png, root / "img_raw" / rel)
    return root

def arch_steps(tmp, deadline, names=MODELS, batch=BATCH, warm=WARM, steps=STEPS, workers=8):
    """Each model: `warm` then `steps` timed train_steps of train.py's own run at `batch`, bf16
    autocast (--amp auto), NFB off -> {name: s/step, images/s, peak GiB, the estimate}."""
    import torch
    root = placeholder_cirr(tmp / "cirr", batch * (warm + steps))
    models = {}
    for name, memory in ((n, m) for n in names for m in MEMORY_FLAGS):   # plain, then both flags
        key = " ".join([name, *memory])
        if left(deadline) < 30:
            models[key] = dict(ok=False, error="not run: the time budget is spent")
            continue
        say(f"archs: {key}")
        try:
            models[key] = one_arch(name, root, tmp, batch, warm, steps, workers, memory)
        except Exception as e:          # one model's failure (say, out of memory) is a result
            models[key] = dict(ok=False, error=f"{type(e).__name__}: {first_line(e)}")
        gc.collect()
        torch.cuda.empty_cache()
        say(f"archs: {key}: {models[key]}")
    return dict(ok=all(m["ok"] for m in models.values()), batch=batch, warm_steps=warm,
                timed_steps=steps, models=models)

def one_arch(name, root, tmp, batch, warm, steps, workers, memory=()):
    """The steps of one model, from its random weights saved as an OpenAI-format state dict;
    memory: train.py's memory flags."""
    import torch
    import model as M
    import runtime
    import train
    torch.manual_seed(0)
    weights = tmp / f"{name.replace('/', '-')}.pt"
    torch.save(M.CLIP(**ARCHS[name]).state_dict(), weights)
    torch.cuda.reset_peak_memory_stats()
    flags = ["--dataset", "cirr", "--data-root", str(root), "--batch-size", str(batch),
             "--workers", str(workers), "--no-nfb", *memory]
    with contextlib.redirect_stdout(io.StringIO()), every_image_distinct():
        run = train.build(runtime.settings([*flags, "--clip", str(weights),
                                            "--out", str(tmp / "runs" / weights.stem)]))
        weights.unlink()
        batches, epoch = [], 0                   # loaded first: the steps alone are timed
        while len(batches) < warm + steps:     # (placeholder_cirr: one epoch holds them all)
            loader = iter(train.make_loader(run, epoch))
            batches += [b for _, b in zip(range(warm + steps - len(batches)), loader)]
            del loader
            epoch += 1
        times, losses = [], []
        for b in batches:
            b = train.on_device(run, b)
            torch.cuda.synchronize()
            t = time.perf_counter()
            losses.append(train.train_step(run, b, None))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    timed = times[warm:]
    per_step = sum(timed) / len(timed)
    gib = 2 ** 30
    rec = dict(ok=all(map(math.isfinite, losses)),
               amp=str(run.amp.fast_dtype) if hasattr(run.amp, "fast_dtype") else "fp32",
               s_per_step=round(per_step, 4), min_s_per_step=round(min(timed), 4),
               images_per_s=round(2 * batch / per_step, 1),
               peak_gib=round(torch.cuda.max_memory_allocated() / gib, 2),
               reserved_gib=round(torch.cuda.max_memory_reserved() / gib, 2),
               losses=[round(x, 4) for x in losses])
    del run, batches, b
    rec["estimate_gib"] = estimated_peak([*flags, "--clip", name])
    if isinstance(rec["estimate_gib"], float):
        rec["measured_over_estimate"] = round(rec["peak_gib"] / rec["estimate_gib"], 3)
    return rec

def estimated_peak(flags):
    """tools.memory's computed peak (GiB) for the same train.py flags, or why there is none."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return round(estimate(flags)["peak"] / 2 ** 30, 2)
    except (Exception, SystemExit) as e:
        return f"error: {type(e).__name__}: {first_line(e)}"

# -----------------------------------------------------------------------------
# the report

def first_line(e):
    return (str(e).strip().splitlines() or [""])[-1 if "Original Traceback" in str(e) else 0]

def part(report, out, name, fn, *args, **kw):
    """One part: its result, wall time and error line into the report, written at once."""
    t = time.perf_counter()
    say(f"{name}: start")
    try:
        rec = fn(*args, **kw)
    except (Exception, SystemExit) as e:     # a failed part is a result: record it, go on
        rec = dict(ok=False, error=f"{type(e).__name__}: {first_line(e)}")
    rec["seconds"] = round(time.perf_counter() - t, 1)
    report["parts"][name] = rec
    write(report, out)
    say(f"{name}: {'ok' if rec['ok'] else 'FAILED'} ({rec['seconds']:.0f} s)")
    return rec

def write(report, out):
    report["seconds"] = round(time.perf_counter() - _T0, 1)
    tmp = Path(f"{out}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out)

@contextlib.contextmanager
def alarm(seconds):
    """A TimeoutError in this process after `seconds` (in-process work cannot be killed)."""
    def ring(*_):
        raise TimeoutError(f"stopped at the {BUDGET} s budget")
    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(1, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)

def summary(report):
    """The report in a few lines."""
    p = report["parts"]
    lines = [f"gpu_check: {report['device']}, torch {report['torch']}, "
             f"{report['seconds']:.0f} s -> {report['out']}"]
    if "tests" in p:
        t = p["tests"]
        counts = ", ".join(f"{v} {k}" for k, v in t.get("counts", {}).items())
        lines.append(f"  tests  {counts or t.get('error')} ({t['seconds']:.0f} s)")
        lines += [f"    {k}: {v['outcome']} {v['message']}" for k, v in t.get("tests", {}).items()
                  if v["outcome"] != "passed"]
    for dev in ("gpu", "cpu"):
        if f"toy_{dev}" in p:
            r = p[f"toy_{dev}"]
            got = (f"R@1 {r['R@1']:.2f} (epoch {r['best_epoch']}), {r['wall_s']:.0f} s"
                   if "R@1" in r else r.get("error", f"exit code {r.get('returncode')}"))
            lines.append(f"  toy    {dev.upper()}: {got}")
    if "toy_r1_gpu_minus_cpu" in report:
        lines.append(f"  toy    R@1 GPU - CPU: {report['toy_r1_gpu_minus_cpu']:+.2f}; the CPU "
                     f"took {report['toy_cpu_over_gpu_time']:.1f}x the GPU's time")
    for name, m in p.get("archs", {}).get("models", {}).items():
        est = m.get("estimate_gib")
        est = f"{est:.1f} GiB" if isinstance(est, float) else est
        lines.append(f"  {name:9s} " + (
            f"{m['s_per_step']:.3f} s/step, {m['images_per_s']:.0f} images/s, peak "
            f"{m['peak_gib']:.1f} GiB (computed: {est})" if "s_per_step" in m else m["error"]))
    if "error" in p.get("archs", {}):
        lines.append(f"  archs  {p['archs']['error']}")
    return "\n".join(lines)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="the JSON report (gpu_check.json)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="the parts to run (all)")
    a = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); run it on a "
              "machine with one", file=sys.stderr)
        sys.exit(2)
    deadline = _T0 + BUDGET - 10                  # 10 s to write the report and the summary
    out = Path(a.out).resolve()
    report = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                  cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported(),
                  cpus=os.cpu_count(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                  budget_s=BUDGET, out=str(out), parts={})
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        cpu_run = None
        if "toy" in a.parts:                      # the longest part: started first, waited last
            try:
                cpu_run = start_cpu_toy(tmp)
            except Exception as e:
                report["parts"]["toy_cpu"] = dict(ok=False, seconds=0.0,
                                                  error=f"{type(e).__name__}: {first_line(e)}")
        if "tests" in a.parts:
            part(report, out, "tests", cuda_tests, tmp, min(240, left(deadline) - 150))
        if "toy" in a.parts:
            part(report, out, "toy_gpu", toy_gpu, tmp, min(180, left(deadline) - 100))
        if "archs" in a.parts:
            with alarm(left(deadline)):
                part(report, out, "archs", arch_steps, tmp, deadline)
        if cpu_run:
            say("toy_cpu: waiting for the CPU run")
            part(report, out, "toy_cpu", toy_cpu, tmp, cpu_run, left(deadline))
        gpu, cpu = report["parts"].get("toy_gpu", {}), report["parts"].get("toy_cpu", {})
        if "R@1" in gpu and "R@1" in cpu:
            report["toy_r1_gpu_minus_cpu"] = round(gpu["R@1"] - cpu["R@1"], 2)
            report["toy_cpu_over_gpu_time"] = round(cpu["wall_s"] / gpu["wall_s"], 2)
    finally:
        if cpu_run and cpu_run["proc"].poll() is None:  # an error above: stop our CPU run
            os.killpg(cpu_run["proc"].pid, signal.SIGKILL)
            cpu_run["proc"].wait()
        write(report, out)
        shutil.rmtree(tmp, ignore_errors=True)
    print(summary(report))
    ok = all(r["ok"] for r in report["parts"].values())
    sys.exit(0 if ok else 1)

if __name__ == "__main__":
    main()
