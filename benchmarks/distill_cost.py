"""Training cost of the three-head distillation vs full fine-tuning, per image (SPEC §3 cost metrics;
paper Table 1: 750 vs 2500 ms/img for CLIP ViT-L/14@336 with a ViT-B/16 teacher).

Both run through the one fine-tuning loop (`robustify.methods.finetune.finetune`) in ONE process, on
the same in-memory random images, from the same random-init CLIP (`--arch`, default ViT-L-14 at its
224 px: step time does not depend on weight values, and no weights can be downloaded here) with a
random-init zero-shot head of `--classes` classes. The teacher is a random-init timm `--teacher`
(default ViT-B/16) saved as a teacher directory, as the `teachers` stage writes it.

A step's time is the loop's `FineTuneResult.step_times`: it excludes the method's `prepare` (AugMix +
DeepAugment of the augmented rows: data work a loader does, as "data loading excluded" asks) and
includes everything else. The three-head method runs with `cache_prefix` (paper §4.1: the frozen
backbone's features of the clean images are computed once per run), so its step is: the frozen
prefix's no-grad forward on the augmented rows only (a = 0.5), the shared section and the heads'
forward + backward (each head only on its rows), T_clean's logits (the original trailing layers on
the prefix features), T_robust's forward on the augmented rows, the routed loss and Adam. FT's step
is the whole tower's forward + backward + AdamW. Neither applies a random augmentation to clean
images (`augment: none`, which the cache needs). The first `--warmup` steps of each run are dropped,
the runs alternate `--rounds` times, and each time per image is the median over all timed steps /
batch.

The cache's one filling pass (a prefix forward per training image, like LP's feature pass) is not a
step: it is printed apart, with the ratio it gives when amortised over `--epochs` epochs, and the
ratio without the cache (every row through the prefix, as `cache_prefix: false` trains) is printed
too.

Last line: `RESULT distill_cost_ratio <three-head ms/img / FT ms/img> x` (target <= 0.35).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import torch
import torch.nn.functional as F

from robustify.config import ModelSpec
from robustify.eval.cost import ms_per_image
from robustify.methods.finetune import FineTuneConfig, finetune, make_method, tuned_and_reference
from robustify.methods.train_data import ImageData
from robustify.models.clip import create_clip
from robustify.models.timm_models import create_timm, save_timm_classifier, timm_classifier
from robustify.models.zeroshot import ZeroShotHead


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-L-14", help="open_clip student architecture")
    ap.add_argument("--teacher", default="vit_base_patch16_224", help="timm teacher architecture")
    ap.add_argument("--fraction-tuned", type=float, default=0.1, help="paper Table 10: ~0.1 of ViT-L")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps per run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=50,
                    help="epochs to amortise the cache's filling pass over (the paper-scale configs train 50)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    clip = create_clip(ModelSpec("open_clip", a.arch), init_seed=0)
    size = clip.visual.image_size[-1] if isinstance(clip.visual.image_size, tuple) else clip.visual.image_size
    dim = clip.visual.output_dim
    gen = torch.Generator().manual_seed(0)
    head = ZeroShotHead(F.normalize(torch.randn(dim, a.classes, generator=gen), dim=0), 4.6)
    n = a.batch_size * 4
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, a.classes, (n,), generator=gen)
    pp = clip.visual.preprocess_cfg
    data = ImageData(images, labels, tuple(pp["mean"]), tuple(pp["std"]))
    val = ImageData(images[: a.batch_size], labels[: a.batch_size], data.mean, data.std)
    cfg = FineTuneConfig(steps=a.warmup + a.steps, batch_size=a.batch_size, lr=1e-5, weight_decay=0.0,
                         eval_every=0, augment="none")

    with tempfile.TemporaryDirectory() as tmp:
        teacher = timm_classifier(create_timm(ModelSpec("timm", a.teacher), num_classes=a.classes, init_seed=0))
        save_timm_classifier(tmp, teacher, a.teacher, {"model_id": f"teachers/{a.teacher}"})
        del teacher
        three = {"fraction_tuned": a.fraction_tuned, "teacher": tmp, "teacher_name": a.teacher}
        methods = {
            "ft": ("ft", {}),
            "three-head": ("three-head", {**three, "cache_prefix": True}),
            "uncached": ("three-head", three),
        }
        fill: list[float] = []
        times: dict[str, list[float]] = {k: [] for k in methods}
        counts: dict[str, int] = {}
        for r in range(a.rounds):
            order = list(methods) if r % 2 == 0 else list(reversed(methods))
            for key in order:
                name, params = methods[key]
                model, reference, _ = tuned_and_reference(copy.deepcopy(clip), head)
                method = make_method(name, params)
                result = finetune(model, reference, method, data, val, cfg, seed=r, device=a.device)
                times[key] += result.step_times[a.warmup:]
                if key == "three-head":
                    fill.append(method.cache_seconds / n)
                counts[key] = sum(p.numel() for p in result.model.parameters() if p.requires_grad) \
                    if key == "ft" else method.student.count_trainable()
                print(f"round {r} {key:<10} median step {statistics.median(result.step_times[a.warmup:]):.2f} s, "
                      f"prepare {statistics.median(result.prep_times[a.warmup:]):.2f} s", flush=True)
                del model, reference, method, result

    ms = {k: ms_per_image(v, a.batch_size) for k, v in times.items()}
    print(f"\n{a.arch} student ({size} px), {a.teacher} teacher, batch {a.batch_size}, fraction tuned "
          f"{a.fraction_tuned}, {a.rounds} rounds x {a.steps} timed steps, {a.threads} threads on {a.device}")
    print(f"{'method':<12}{'ms/img':>10}{'trainable':>14}")
    for k in methods:
        print(f"{k:<12}{ms[k]:>10.0f}{counts[k]:>14,}")
    fill_ms = 1000 * statistics.median(fill)
    print(f"prefix cache: filled once per run at {fill_ms:.0f} ms/img; amortised over {a.epochs} epochs the "
          f"three-head ratio is {(ms['three-head'] + fill_ms / a.epochs) / ms['ft']:.2f} x; without the cache "
          f"{ms['uncached'] / ms['ft']:.2f} x")
    print(f"RESULT distill_cost_ratio {ms['three-head'] / ms['ft']:.2f} x")


if __name__ == "__main__":
    main()
