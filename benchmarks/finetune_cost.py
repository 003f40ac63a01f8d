"""Training cost of every fine-tuning method: median optimisation-step time relative to plain FT.

All registered methods run through the one loop, `robustify.methods.finetune.finetune`, in ONE process
on the same in-memory data (random uint8 images, normalised and shift-augmented per step as in a real
run) and the same random-init CLIP (`--arch`, default the mini-world's `tinyclip-rn32` at 32 px; no
weights are needed — step time does not depend on their values). A step's time is the loop's own
`FineTuneResult.step_times`: lr schedule, batch indices, normalise + augment, forward, CE + the
method's extra term, backward, AdamW, the method's `on_step_end` (EMA's update); data loading is not
in it (the data is in memory) and neither is the evaluation at the end of a run.

Methods are interleaved so that machine noise hits all alike: `--rounds` rounds, each running every
method for `--warmup` + `--steps` steps (a fresh tuned copy per run, the same recipe: batch
`--batch-size`, AdamW, warm-up + cosine), the method order rotated each round. The first `--warmup`
steps of every run are dropped (allocator, oneDNN/cuDNN primitive creation). A method's time is the
median over its R × N timed steps; its ratio is that median over FT's. Per-round medians are printed
too: their spread is the noise of the measurement. On a shared machine a load meter (as in
eval_throughput.py: /proc/stat minus this process's rusage) gives the share of the CPU other processes
took during each run's timed steps; a run above `--max-others` (10%) is run again, up to `--retries`
times, keeping the least competed attempt (2 cores: another process on one core slows a 2-thread step
several-fold, far beyond the differences measured here). Host-level noise (other VMs, clock changes)
is invisible to that meter and moves whole runs by ~5-10%: Scratch-FT and LP-FT do exactly FT's work
per step, so their distance from 1.00x is the noise floor of a given invocation.

Special cases: LP trains the head on features cached once before the loop (no encoder forward per
step), it is shown but much cheaper. LP-FT's LP phase (`--lp-steps` head-only steps, run inside its
setup) is not timed: its row is the FT phase after it, which is FT's step. Lipsum-FT uses the paper's
defaults, M=`--texts` 80 random texts of `--length` 8 tokens from the full vocabulary, resampled each
step: its extra cost is a no-grad forward of the frozen θ0 image tower on the batch (which KD, CAR-FT
and FeatKD also pay) plus the text tower on the M texts. A breakdown of that extra cost follows the
table: the same pieces timed alone on one batch (text sampling, text encoding, θ0 forward), and what
encoding the texts over the whole context would cost.

The loop's own cost measures (each the same math up to float rounding; see methods/finetune.py):
conv towers (ModifiedResNet) train in the channels_last layout; θ0's no-grad forward computes only
the attention-pool query it keeps (`frozen_features`); the random texts are encoded over the
positions up to their EOT only, the last text block at the EOT row only (`encode_random_texts`).
The CLIP is built on the CPU: `finetune` moves the towers and the text side to `--device`. On CUDA
the loop synchronises before taking a step's time, so step times include the GPU work.

What to expect: a no-grad forward of the same tower on the same batch costs about a quarter to a
third of a forward + backward + AdamW step, so every method that needs θ0's features (KD, CAR-FT,
FeatKD, Lipsum-FT) lands near 1.25x, Lipsum-FT a few points above them (its text tower). Measured
here (tinyclip-rn32, batch 128, 2 CPU cores, 3 quiet invocations): FT 65-66 ms/step; KD, CAR-FT,
FeatKD 1.23-1.27x; Lipsum-FT 84-85 ms, 1.29-1.30x (per round 1.27-1.32); its extra ~19 ms = the θ0
forward 15.4 ms (23.5% of an FT step) + the text tower 2.25 ms (3.4%; 5.2 ms over the whole context
of 20) + ~1.5 ms for the term and its backward. Before those measures: FT 81 ms, Lipsum-FT 1.36x.
The Lipsum-FT paper's ~1.2x ("analysis on training costs") is the wall clock of whole 50k-step TPU
runs, evaluation and input pipeline included, which dilute the extra forward; this script times
optimisation steps only. Target: lipsum-ft / ft <= 1.3. Last line: `RESULT lipsum_step_ratio <x> x`.

    python benchmarks/finetune_cost.py [--steps 20] [--rounds 3] [--warmup 3] [--threads N]
    python benchmarks/finetune_cost.py --arch ViT-B-16 --image-size 224 --device cuda [--amp bf16]
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from robustify.config import ModelSpec
from robustify.methods.finetune import (
    Batch, FineTuneConfig, ImageData, RunContext, augment_batch, batch_indices, finetune, frozen_features, make_method,
    step_generator, training_layout, tuned_and_reference,
)
from robustify.models.clip import create_clip, model_config, tokenizer
from robustify.models.random_texts import sample_texts
from robustify.models.zeroshot import build_zeroshot_head

METHODS = ("ft", "scratch-ft", "lp", "lp-ft", "ema", "l2sp", "kd", "car-ft", "featkd", "lipsum-ft")
NOTES = {  # what a method does beyond FT that is not a loss term
    "scratch-ft": "head init 0",
    "lp": "head only, cached features",
    "lp-ft": "FT phase only (after LP)",
    "ema": "+ EMA update per step",
    "kd": "+ θ0 forward",
    "car-ft": "+ θ0 forward",
    "featkd": "+ θ0 forward",
    "lipsum-ft": "+ θ0 forward + text tower (M texts)",
}
CLASSES = ["circle", "square", "triangle", "star", "heart", "cross", "pentagon", "hexagon", "moon", "arrow",
           "diamond", "ring"]  # 12 classes, as the mini-world
TEMPLATES = ["a photo of a {}.", "a pencil sketch of a {}.", "a clipart of a {}.", "a painting of a {}.",
             "an infographic of a {}.", "a {}."]  # params.yaml `zeroshot.templates` (CAR-FT needs >= 2)
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
LOGGED = {"step", "val_accuracy", "lr", "grad_norm", "loss", "ce"}  # history keys that are not an extra term
FULL = "(full context)"  # breakdown entry that is not part of the step: the text tower on all positions


def build_clip(arch: str, image_size: int | None) -> torch.nn.Module:
    """Random-init CLIP (seed 0) at `image_size` (None: the config's own), on the CPU: `finetune`
    moves the towers and the text side to its device."""
    native = model_config(arch)["vision_cfg"]["image_size"]
    if image_size is None or image_size == native:
        clip = create_clip(ModelSpec("open_clip", arch), init_seed=0)
    else:
        import open_clip

        logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about the random init we asked for
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip = open_clip.create_model(arch, pretrained=None, force_image_size=image_size).eval()
    return clip


def make_data(n: int, size: int, seed: int) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return ImageData(images, torch.randint(0, len(CLASSES), (n,), generator=g), MEAN, STD)


def sync_fn(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def _cpu_sample() -> tuple[float, float, float]:
    """(wall s, busy CPU s of the whole machine from /proc/stat, this process's CPU s)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    except (OSError, ValueError):
        busy = float("nan")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), busy, usage.ru_utime + usage.ru_stime


def foreign_share(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Share of the machine's cores that other processes used between two samples (0 = quiet)."""
    wall, busy, own = (y - x for x, y in zip(a, b, strict=True))
    return max(0.0, (busy - own) / (wall * (os.cpu_count() or 1))) if wall > 0 else float("nan")


def run_method(name: str, params: dict, world: dict, cfg: FineTuneConfig, device: str,
               warmup: int) -> tuple[list[float], list[str], float]:
    """One fine-tuning run of `name`: (its step times in s, the names of its extra loss terms, the share
    of the machine other processes used during its timed steps)."""
    model, reference, text = tuned_and_reference(copy.deepcopy(world["clip"]), copy.deepcopy(world["head"]))
    text.tokenize = world["tok"]
    method = make_method(name, params)
    samples: list[tuple[float, float, float]] = []
    inner = method.on_step_end

    def on_step_end(m: torch.nn.Module, step: int) -> None:
        inner(m, step)
        if step + 1 == warmup or step + 1 == cfg.steps:
            samples.append(_cpu_sample())  # the timed steps' window, for the load meter

    method.on_step_end = on_step_end
    gc.collect()
    sync_fn(device)()
    result = finetune(model, reference, method, world["train"], world["val"], cfg, seed=0, text=text, device=device)
    terms = [k for k in result.history[-1] if k not in LOGGED] if result.history else []
    return result.step_times, terms, foreign_share(*samples)


def timed(fn: Callable[[], object], sync: Callable[[], None], repeats: int, warmup: int = 3) -> float:
    """Median seconds of `fn()` over `repeats` calls after `warmup` calls."""
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def lipsum_breakdown(world: dict, cfg: FineTuneConfig, params: dict, device: str, repeats: int) -> dict[str, float]:
    """Median seconds of each piece of Lipsum's extra work, alone, on step 0's batch."""
    model, reference, text = tuned_and_reference(copy.deepcopy(world["clip"]), copy.deepcopy(world["head"]))
    text.tokenize = world["tok"]
    text.to(device)
    layout = training_layout(reference.encoder)  # as the loop lays the towers and the batch out
    reference.to(device, memory_format=layout).eval()
    model.to(device, memory_format=layout).train()
    method = make_method("lipsum-ft", params)
    method.setup(model, RunContext(reference, text, world["train"], world["val"], cfg, 0, device))
    train = world["train"]
    idx = batch_indices(0, 0, len(train), cfg.batch_size)
    images = augment_batch(train.normalise(train.images[idx], device), cfg.augment, cfg.shift_px,
                           step_generator(0, 2, 0)).contiguous(memory_format=layout)
    sync = sync_fn(device)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    batch = Batch(images, train.labels[idx].to(device), None, None, 0, 0, reference)
    ids = method.random_texts(batch).to(device)

    def theta0_forward() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            frozen_features(reference.encoder, images)  # as `Batch.reference_features` computes it

    def encode() -> None:
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            text.encode(ids)

    def encode_full() -> None:  # what encoding the whole context would cost (not in the step)
        with torch.no_grad(), torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            text.module.encode_text(ids)

    def sample() -> None:
        sample_texts(method.pool, method.texts, method.length, method.context_length, *method.special,
                     step_generator(0, 3, 0, 0)).to(device)

    return {"sample texts": timed(sample, sync, repeats), "encode texts": timed(encode, sync, repeats),
            "θ0 forward": timed(theta0_forward, sync, repeats), FULL: timed(encode_full, sync, repeats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="tinyclip-rn32", help="open_clip config (shipped or builtin), random init")
    ap.add_argument("--image-size", type=int, default=None, help="image side in px (default: the config's own)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast dtype (CUDA only)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per method and round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all methods, order rotated each round")
    ap.add_argument("--texts", type=int, default=80, help="Lipsum-FT: random texts per step (M)")
    ap.add_argument("--length", type=int, default=8, help="Lipsum-FT: tokens per random text (L)")
    ap.add_argument("--lp-steps", type=int, default=5, help="LP-FT: steps of its (untimed) LP phase")
    ap.add_argument("--train-images", type=int, default=None, help="in-memory training images (default 4 batches)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset (ft and lipsum-ft always run)")
    ap.add_argument("--max-others", type=float, default=0.1,
                    help="rerun a method's run if other processes used more than this share of the CPU during it")
    ap.add_argument("--retries", type=int, default=1, help="reruns at most per run (the least competed one is kept)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the breakdown of Lipsum's extra cost")
    a = ap.parse_args()
    if a.warmup < 1 or a.steps < 2 or a.rounds < 1:
        ap.error("--warmup >= 1, --steps >= 2 and --rounds >= 1 are needed")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    names = ["ft"] + [m for m in a.methods.split(",") if m and m not in ("ft", "lipsum-ft")] + ["lipsum-ft"]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {unknown} (known: {', '.join(METHODS)})")
    params = {"lp-ft": {"lp_steps": a.lp_steps}, "lipsum-ft": {"texts": a.texts, "length": a.length}}

    t0 = time.perf_counter()
    clip = build_clip(a.arch, a.image_size)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else int(size)
    tok = tokenizer(a.arch)
    head = build_zeroshot_head(clip, tok, CLASSES, TEMPLATES)
    n_train = a.train_images or 4 * a.batch_size
    world = {"clip": clip, "head": head, "tok": tok, "train": make_data(n_train, size, 0), "val": make_data(256, size, 1)}
    cfg = FineTuneConfig(steps=a.warmup + a.steps, batch_size=a.batch_size, lr=1e-5, amp=a.amp, eval_every=0)
    params_m = sum(p.numel() for p in clip.visual.parameters()) / 1e6
    print(f"{a.arch} at {size} px (image tower {params_m:.1f}M params), device {a.device}, amp {a.amp}, "
          f"batch {a.batch_size}, {n_train} train images; torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"{a.rounds} rounds x {len(names)} methods x ({a.warmup} warm-up + {a.steps} timed) steps; "
          f"Lipsum M={a.texts} L={a.length}, context {tok.context_length}; set-up {time.perf_counter() - t0:.1f} s")

    times: dict[str, list[float]] = {m: [] for m in names}
    rounds: dict[str, list[float]] = {m: [] for m in names}
    terms: dict[str, list[str]] = {}
    others: list[float] = []
    retried = 0
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        start, first = time.perf_counter(), len(others)
        for name in order:
            for attempt in range(a.retries + 1):  # a run other processes competed with is run again
                got = run_method(name, params.get(name, {}), world, cfg, a.device, a.warmup)
                if attempt == 0 or got[2] < share:
                    step_times, terms[name], share = got
                if not share > a.max_others or attempt == a.retries:  # NaN: no /proc/stat, no meter
                    break
                retried += 1
            others.append(share)
            kept = step_times[a.warmup:]
            times[name] += kept
            rounds[name].append(statistics.median(kept))
        ft = rounds["ft"][-1]
        print(f"  round {r} ({time.perf_counter() - start:.0f} s): "
              + ", ".join(f"{m} {rounds[m][-1] / ft:.2f}" for m in names if m != "ft")
              + f"  (x FT's {ft * 1e3:.1f} ms; others used <= {max(others[first:]):.0%} of the CPU)", flush=True)

    ft = statistics.median(times["ft"])
    rows = []
    for name in names:
        med, q = statistics.median(times[name]), statistics.quantiles(times[name], n=4)
        per_round = "/".join(f"{v / f:.2f}" for v, f in zip(rounds[name], rounds["ft"], strict=True))
        rows.append((name, f"{med * 1e3:.1f}", f"{q[0] * 1e3:.1f}-{q[2] * 1e3:.1f}", f"{med / ft:.2f}x", per_round,
                     ", ".join(terms[name]) or "-", NOTES.get(name, "")))
    header = ("method", "ms/step", "p25-p75 ms", "vs FT", "per round", "extra loss term", "note")
    width = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for r in [header, *rows]:
        print("  ".join(v.ljust(w) if i in (0, 5, 6) else v.rjust(w) for i, (v, w) in enumerate(zip(r, width))).rstrip())
    print("(ms/step, vs FT: median over all timed steps; per round: each round's median ratio)")
    busy = max(others)
    print(f"other processes used {statistics.median(others):.0%} of the CPU in the median run, {busy:.0%} at most "
          f"({retried} run(s) repeated for it)" + ("  -- a busy machine: rerun when it is quiet" if busy > a.max_others else ""))

    if not a.no_breakdown:
        pieces = lipsum_breakdown(world, cfg, params["lipsum-ft"], a.device, repeats=max(a.steps, 10))
        extra = statistics.median(times["lipsum-ft"]) - ft
        print(f"\nLipsum-FT's extra {extra * 1e3:.1f} ms/step over FT; its pieces timed alone on one batch:")
        full = pieces.pop(FULL)
        for piece, seconds in pieces.items():
            print(f"  {piece:<14}{seconds * 1e3:8.2f} ms  ({seconds / ft:.1%} of an FT step)")
        rest = extra - sum(pieces.values())
        print(f"  {'rest':<14}{rest * 1e3:8.2f} ms  (the energies' difference, the term and its backward, the log's sync; noise)")
        print(f"  (the text tower over the whole context of {tok.context_length} would take {full * 1e3:.2f} ms, "
              f"{full / ft:.1%}: the loop encodes the {a.length + 2} positions up to the EOT)")
    print(f"RESULT lipsum_step_ratio {statistics.median(times['lipsum-ft']) / ft:.2f} x")


if __name__ == "__main__":
    main()
