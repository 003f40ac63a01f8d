"""One training loop for image-encoder fine-tuning with a classification head (SPEC §2).

Every fine-tuning method (FT, Scratch-FT, LP, LP-FT, EMA, L2SP, KD, CAR-FT, FeatKD, Lipsum-FT) is a
`FineTuneMethod` registered by name that adds a loss term and/or hooks; the loop never names one.

The recipe is the Lipsum-FT reference's: AdamW, linear warm-up over the first `warmup` fraction of
the steps then cosine decay to 0, cross-entropy on `ImageClassifier` logits, optional global-norm
gradient clipping, evaluation every `eval_every` steps on the reference *validation* split keeping the
best checkpoint. Reproducibility: the batch of step t, its augmentation and any per-step randomness a
method draws (Lipsum's random texts) are pure functions of (seed, t), so a run resumed from its
periodic checkpoint ends with the same weights as an uninterrupted one, and under DDP every rank
draws the same texts and takes its slice of the same global batch.

Data: any `TrainSource` (`methods.train_data`): the in-memory `ImageData` or `StreamingImages`,
decoded from files by worker processes; both hand the loop the uint8 batch of (seed, step), which it
normalises and augments on the device.

Cost (benchmarks/finetune_cost.py): conv towers train in the channels_last layout, θ0's no-grad
forward computes only the attention-pool row it keeps (`frozen_features`), and Lipsum's random texts
are encoded only up to their EOT (`TextSide.encode`); each the same math up to float rounding.

Frozen reference: the zero-shot classifier (θ0 tower + zero-shot head) is deep-copied *before* being
frozen, and the tuned copy's parameters are switched on explicitly — freezing first would silently
freeze the copy too (shared/notes/miniworld-facts.md).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustify.io import atomic_path
from robustify.methods.schedules import batch_indices, step_generator, warmup_cosine
from robustify.methods.train_data import ImageData, TrainSource  # noqa: F401  (ImageData: re-exported)
from robustify.models.random_texts import encode_random_texts
from robustify.models.zeroshot import ImageClassifier

log = logging.getLogger(__name__)
MetricsFn = Callable[[dict[str, float], int], None]
AUGMENTS = ("none", "shift", "flip-shift")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FineTuneConfig:
    """The loop's hyper-parameters (params.yaml `finetune:`; paper defaults in SPEC §2)."""

    steps: int
    batch_size: int
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of the steps
    grad_clip: float | None = None  # global L2 norm; None = off
    amp: str = "none"  # none | bf16 | fp16 (CUDA only)
    eval_every: int = 0  # 0 = only at the end
    checkpoint_every: int = 0  # resumable state every N steps; 0 = none
    augment: str = "shift"
    shift_px: int = 2
    label_smoothing: float = 0.0
    eval_batch_size: int = 500

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"finetune: steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"finetune.warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"finetune.amp must be one of {list(AMP_DTYPES)}, got '{self.amp}'")
        if self.augment not in AUGMENTS:
            raise ValueError(f"finetune.augment must be one of {list(AUGMENTS)}, got '{self.augment}'")

    @property
    def warmup_steps(self) -> int:
        return math.floor(self.warmup * self.steps)  # lipsum-ft: floor(0.1 * num_iters)


# ------------------------------------------------------------------------------------------ data
def augment_batch(images: torch.Tensor, kind: str, max_px: int, gen: torch.Generator, first: int = 0,
                  total: int | None = None) -> torch.Tensor:
    """Cheap label-preserving augmentation of a float batch: random translation (reflect-padded) and,
    for `flip-shift`, horizontal flips. The draws are made for the whole global batch of `total`
    images from `gen` and this batch takes rows `first:first + n`, so a DDP rank's slice is augmented
    exactly as in a single-process run and the batch is a function of (seed, step)."""
    n, _, h, w = images.shape
    total = n if total is None else total
    if kind == "none" or n == 0:
        return images
    flip = torch.rand(total, generator=gen)[first:first + n] < 0.5
    off = torch.randint(0, 2 * max_px + 1, (total, 2), generator=gen)[first:first + n]
    if kind == "flip-shift":
        images = torch.where(flip.to(images.device).view(n, 1, 1, 1), images.flip(-1), images)
    if max_px == 0:
        return images
    padded = F.pad(images, (max_px,) * 4, mode="reflect")
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(off.tolist())])


# ------------------------------------------------------------------------------- frozen towers
def frozen_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """`encoder(images)` for a tower that needs no gradient (θ0, LP's cached features), computing
    only what the output depends on.

    open_clip's ModifiedResNet attention-pools its HW+1 tokens (the mean token first) with *every*
    token as a query and keeps the first query's output; here only that query is computed (OpenAI's
    later CLIP code does the same). Same features up to float rounding; the mini-world RN tower's
    no-grad forward is ~6% cheaper (16.2 -> 15.3 ms per 128 images; its query and output projections
    run on 1 of 2 rows, 1 of 50 for a 224-px RN50). Other towers, or a tower with hooks, run whole.
    """
    from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet

    if (type(encoder) is not ModifiedResNet or type(encoder.attnpool) is not AttentionPool2d
            or encoder._forward_hooks or encoder._forward_pre_hooks):
        return encoder(images)
    x = encoder.stem(images)
    x = encoder.layer4(encoder.layer3(encoder.layer2(encoder.layer1(x))))
    return _attention_pool_first(encoder.attnpool, x)


def _attention_pool_first(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's `AttentionPool2d.forward(x)` = its first query's output, computed for that query only."""
    x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)  # NCHW -> (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1)NC
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    out, _ = F.multi_head_attention_forward(
        query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=pool.training, need_weights=False)
    return out[0]


# ------------------------------------------------------------------------------- methods' view
@dataclass
class TextSide:
    """The frozen text tower, for methods that regularise through text (Lipsum-FT).

    `module` holds the tower's weights; the loop moves it to the run's device (`to`), so a caller
    need not move the whole CLIP first. `encode` runs on the module's device."""

    encode: Callable[[torch.Tensor], torch.Tensor]  # token ids → unit-norm embeddings (no grad)
    tokenize: Any
    corpus: list[str] = field(default_factory=list)  # captions, for the `seen` token pool
    module: nn.Module | None = None

    def to(self, device: str | torch.device) -> TextSide:
        if self.module is not None:
            self.module.to(device)
        return self


@dataclass
class RunContext:
    """What a method may use at setup: the frozen reference, the text side, the data, the recipe."""

    reference: ImageClassifier
    text: TextSide | None
    train: TrainSource
    val: TrainSource
    cfg: FineTuneConfig
    seed: int
    device: str


@dataclass(frozen=True)
class StepInfo:
    """Where a rank's rows sit in step `step`'s global batch: rows `first:first + n` of `total`. A method's
    per-row draws (`prepare`: which rows are augmented, each row's AugMix/PixMix) are made for the global
    batch and sliced, so a DDP rank prepares those rows exactly as a single process would. Known
    limitation: a DeepAugment network is drawn per call for the rows at hand, so under DDP each rank
    draws its own (still a function of seed, step and rank)."""

    step: int
    seed: int
    first: int
    total: int
    mean: tuple[float, ...]  # the train source's normalisation, to map images back to [0, 1]
    std: tuple[float, ...]
    n: int = 0  # training items (the epoch permutation's length)

    def indices(self, rows: int) -> torch.Tensor:
        """Dataset indices of the rank's `rows` rows (per-image caches); computed on demand, as the
        epoch permutation costs O(n) per call."""
        if self.n <= 0:
            raise ValueError("StepInfo.indices needs the training set's size n")
        return batch_indices(self.seed, self.step, self.n, self.total)[self.first:self.first + rows]

    def generator(self, *words: int) -> torch.Generator:
        return step_generator(self.seed, 5, self.step, *words)


@dataclass
class Batch:
    """What a method sees of one step: inputs, the tuned model's outputs, and lazily the reference's."""

    images: torch.Tensor  # normalised, augmented, on the device (None for cached-feature training)
    labels: torch.Tensor
    features: torch.Tensor  # F_θ(x), unnormalised
    logits: torch.Tensor
    step: int
    seed: int
    reference: ImageClassifier
    extras: dict[str, Any] = field(default_factory=dict)  # what the method's `prepare` and `forward` passed on
    _ref_features: torch.Tensor | None = None

    @property
    def reference_features(self) -> torch.Tensor:
        """F_θ0(x) of the frozen zero-shot tower (computed once per step, without gradients)."""
        if self._ref_features is None:
            with torch.no_grad():
                self._ref_features = frozen_features(self.reference.encoder, self.images).float()
        return self._ref_features

    @property
    def reference_logits(self) -> torch.Tensor:
        with torch.no_grad():
            return self.reference.head(self.reference_features)

    def generator(self, *words: int) -> torch.Generator:
        """A per-step random stream: identical on every rank and on resume."""
        return step_generator(self.seed, 3, self.step, *words)


class FineTuneMethod:
    """Base of every fine-tuning method: plain FT (zero-shot head init, CE only).

    Subclasses override what they change: `setup` (initialisation, LP phases; it may return another
    module to train, e.g. a partially tuned student built around the classifier), `prepare` (per-step
    input transforms such as AugMix views, timed apart from the step like data loading), `forward`
    (a model whose outputs are not one logits tensor), `extra_loss` (the regulariser λ·R and its logs),
    `on_step_end` (EMA), `eval_model` (which weights are evaluated and saved), and
    `state_dict`/`load_state_dict` for any state a resume must restore. `ce_on_logits = False` drops the
    loop's cross-entropy: the method's `extra_loss` is then the whole loss (routed multi-head losses).
    """

    name: ClassVar[str] = "ft"
    trains_encoder: ClassVar[bool] = True
    ce_on_logits: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        if params:
            raise ValueError(f"method '{self.name}' takes no parameters, got {sorted(params)}")

    @property
    def params(self) -> dict[str, Any]:
        return {}

    def setup(self, model: ImageClassifier, run: RunContext) -> nn.Module | None:
        """Called once before the loop (also on resume, before the checkpoint is loaded). A returned
        module is trained instead of `model` (its parameters that require grad are optimised)."""
        return None

    def prepare(self, images: torch.Tensor, labels: torch.Tensor, info: StepInfo) -> tuple[torch.Tensor, dict[str, Any]]:
        """The step's (normalised, augmented) images → the images to train on and extras for `forward`
        and `extra_loss` (`Batch.extras`)."""
        return images, {}

    def forward(self, net: nn.Module, images: torch.Tensor, extras: dict[str, Any]) -> tuple[torch.Tensor | None, Any] | None:
        """(features, logits) of the trained module `net` (DDP-wrapped under DDP); None = the loop's
        encoder → head forward."""
        return None

    def extra_loss(self, batch: Batch, model: ImageClassifier, text: TextSide | None) -> tuple[torch.Tensor | None, dict[str, float]]:
        return None, {}

    def on_step_end(self, model: ImageClassifier, step: int) -> None:
        """After the optimiser step of `step` (0-based)."""

    def eval_model(self, model: ImageClassifier) -> nn.Module:
        return model

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""


METHODS: dict[str, type[FineTuneMethod]] = {}


def register(cls: type[FineTuneMethod]) -> type[FineTuneMethod]:
    if cls.name in METHODS:
        raise ValueError(f"fine-tuning method '{cls.name}' registered twice")
    METHODS[cls.name] = cls
    return cls


register(FineTuneMethod)


def make_method(name: str, params: dict[str, Any] | None = None) -> FineTuneMethod:
    """The registered method `name` with its parameters (errors name the method and the key)."""
    import robustify.methods.regularizers  # noqa: F401  (registers the methods)

    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown fine-tuning method '{name}' (known: {sorted(METHODS)})") from None
    try:
        return cls(**(params or {}))
    except TypeError as e:
        raise ValueError(f"method '{name}': {e}") from None


def method_accepts(name: str, param: str) -> bool:
    """Whether the registered method `name` takes the parameter `param` (e.g. a distillation teacher)."""
    import inspect

    import robustify.methods.regularizers  # noqa: F401  (registers the methods)

    cls = METHODS.get(name)
    return cls is not None and param in inspect.signature(cls.__init__).parameters


# ------------------------------------------------------------------------------------------ loop
@dataclass
class FineTuneResult:
    model: nn.Module  # the best checkpoint's weights (EMA's average for EMA)
    best_step: int
    best_val_accuracy: float
    history: list[dict[str, float]]
    train_seconds: float
    steps_run: int
    step_times: list[float] = field(default_factory=list)  # per step, without `prepare` (data work)
    prep_times: list[float] = field(default_factory=list)  # per step, the method's `prepare`


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def val_accuracy(model: nn.Module, val: TrainSource, batch_size: int, device: str) -> float:
    """Top-1 accuracy on the whole validation split; under DDP each rank scores a slice and the
    counts are summed, so every rank gets the same number."""
    rank, world = _dist()
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in val.batches(batch_size, device, rank, world):
        correct += (model(images).argmax(1) == labels).sum()
    if world > 1:
        torch.distributed.all_reduce(correct)
    model.train(was_training)
    return float(correct.item()) / len(val)


def _state_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights in the default (contiguous) layout, whatever the training layout."""
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in module.state_dict().items()}


def training_layout(tower: nn.Module, channels_last: bool | None = None) -> torch.memory_format:
    """The memory format the loop trains `tower` in: channels_last for a convolutional tower (more
    than one Conv2d: ModifiedResNet, not a ViT's single patch embedding) unless `channels_last`
    says otherwise. oneDNN and cuDNN run NHWC convolutions faster: the mini-world RN tower's no-grad
    forward takes 0.23 instead of 0.31 ms/img on one CPU thread, its forward + backward 0.72 vs 0.92."""
    if channels_last is None:
        channels_last = sum(isinstance(m, nn.Conv2d) for m in tower.modules()) > 1
    return torch.channels_last if channels_last else torch.contiguous_format


def _is_channels_last(module: nn.Module) -> bool:
    weights = [p for p in module.parameters() if p.ndim == 4]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


def _cached_features(encoder: nn.Module, data: TrainSource, batch_size: int, device: str) -> torch.Tensor:
    """Frozen-encoder features of a whole split (LP trains its head on these; no augmentation)."""
    encoder.eval()
    with torch.no_grad():
        return torch.cat([frozen_features(encoder, x).float() for x, _ in data.batches(batch_size, device)])


def finetune(
    model: ImageClassifier,
    reference: ImageClassifier,
    method: FineTuneMethod,
    train: TrainSource,
    val: TrainSource,
    cfg: FineTuneConfig,
    seed: int,
    text: TextSide | None = None,
    resume_path: Path | None = None,
    fingerprint: str = "",
    log_metrics: MetricsFn | None = None,
    device: str = "cpu",
    stop_after: int | None = None,
    channels_last: bool | None = None,
) -> FineTuneResult:
    """Fine-tune `model` (its tower starts at θ0, its head at the zero-shot head) with `method`.

    `reference` is frozen here (a copy of the zero-shot classifier made by the caller); it, the tuned
    model and the text side are moved to `device`. `train`/`val` are any `TrainSource` (in memory or
    streamed: the same batches either way). A resume state at `resume_path` is used only if its
    `fingerprint` (hash of everything defining the run) matches. `stop_after` ends the run early
    after that many steps (tests of exact resume).

    `channels_last` (None: for convolutional towers, see `training_layout`) trains the tuned and θ0
    towers and the input in the NHWC layout, which oneDNN's and cuDNN's convolutions run faster (the
    mini-world RN tower's FT step: 68 instead of 81 ms on 2 CPU cores); the same math up to float
    rounding. The towers are handed back in the default layout and the saved weights are contiguous.
    On CUDA a step's time is taken after `torch.cuda.synchronize`, so `step_times` are real.
    """
    rank, world = _dist()
    is_cuda = torch.device(device).type == "cuda"
    if cfg.amp != "none" and not is_cuda:
        raise ValueError(f"finetune.amp={cfg.amp} needs a CUDA device (got {device})")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} DDP processes")
    reference.to(device).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(True)  # explicit: a tower copied from a frozen model would stay frozen
    if text is not None:
        text.to(device)
    layout = training_layout(model.encoder, channels_last)
    relaid = [tower for tower in (model.encoder, reference.encoder)  # towers found in the layout (the LP run
              if layout == torch.channels_last and not _is_channels_last(tower)]  # inside LP-FT) are left so
    for tower in relaid:  # before `setup`: EMA's copy and L2SP's anchor share the layout
        tower.to(memory_format=layout)
    trained = method.setup(model, RunContext(reference, text, train, val, cfg, seed, device))
    if trained is not None:
        model = trained.to(device)
    elif not method.trains_encoder:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"method '{method.name}' left no trainable parameter")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
    start, best_acc, best_step, history, best_state = 0, -1.0, 0, [], None
    if resume_path is not None and resume_path.exists():
        state = torch.load(resume_path, map_location=device, weights_only=True)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            method.load_state_dict(state["method"])
            start, best_acc, best_step = int(state["step"]), float(state["best_acc"]), int(state["best_step"])
            best_state, history = state["best_state"], list(state["history"])
            log.info("resumed from step %d (%s)", start, resume_path)
        elif rank == 0:
            resume_path.unlink()

    net: nn.Module = model
    if world > 1 and method.trains_encoder:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[torch.device(device).index] if is_cuda else None)
    amp_dtype = AMP_DTYPES[cfg.amp]
    per_rank = cfg.batch_size // world
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    if method.trains_encoder:  # DDP: each rank its slice of the step's batch, as uint8 images
        cached, feed = None, train.step_batches(seed, start, end, cfg.batch_size, rank, world, device)
    else:  # a head on cached features is cheap: every rank takes the same whole-batch step
        cached = _cached_features(model.encoder, train, cfg.eval_batch_size, device)
        feed = _feature_batches(cached, train.labels, seed, start, end, cfg.batch_size)
    t0, step_times, prep_times, losses = time.perf_counter(), [], [], []
    with contextlib.closing(feed):  # a streamed source's workers stop with the run
        for step in range(start, end):
            t_step = time.perf_counter()
            lr = warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            inputs, labels = next(feed)
            labels = labels.to(device)
            torch.manual_seed(step_generator(seed, 4, step).initial_seed())  # dropout etc.: a function of the step
            model.train()
            if not method.trains_encoder:
                model.encoder.eval()
            with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
                if cached is not None:
                    images, features = None, inputs
                    logits = model.head(features)
                else:
                    images = augment_batch(train.normalise(inputs, device), cfg.augment, cfg.shift_px,
                                           step_generator(seed, 2, step), rank * per_rank, cfg.batch_size)
                    t_prep = time.perf_counter()
                    images, extras = method.prepare(images, labels, StepInfo(
                        step, seed, rank * per_rank, cfg.batch_size, tuple(train.mean), tuple(train.std), len(train)))
                    if is_cuda:
                        torch.cuda.synchronize(device)
                    prep_times.append(time.perf_counter() - t_prep)
                    images = images.contiguous(memory_format=layout)
                    custom = method.forward(net, images, extras)
                    if custom is not None:
                        features, logits = custom
                    elif world > 1:  # DDP must see the whole forward to reduce the gradients
                        features, logits = _ddp_forward(net, images)
                    else:
                        features = model.encoder(images)
                        logits = model.head(features)
                if method.ce_on_logits:
                    ce = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
                else:
                    ce = torch.zeros((), device=labels.device)
                batch = Batch(images, labels, features, logits, step, seed, reference,
                              extras if cached is None else {})
                extra, extra_logs = method.extra_loss(batch, model, text)
                if extra is None and not method.ce_on_logits:
                    raise ValueError(f"method '{method.name}' drops the loop's cross-entropy but returned no loss")
                loss = ce if extra is None else ce + extra
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            grad_norm = float("nan")
            if cfg.grad_clip is not None:
                scaler.unscale_(opt)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            scaler.step(opt)
            scaler.update()
            method.on_step_end(model, step)
            if is_cuda:  # the step's kernels are queued asynchronously: time them, not their launch
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - t_step - (prep_times[-1] if cached is None else 0.0))
            losses.append({"loss": loss.item(), **({"ce": ce.item()} if method.ce_on_logits else {}), **extra_logs})
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 or done == cfg.steps:
                acc = val_accuracy(method.eval_model(model), val, cfg.eval_batch_size, device)
                record = {"step": done, "val_accuracy": acc, "lr": lr, "grad_norm": grad_norm,
                          **{k: float(np.mean([r[k] for r in losses[-cfg.eval_every or None:]])) for k in losses[-1]}}
                history.append(record)
                if acc > best_acc:  # strictly better: ties keep the earlier checkpoint
                    best_acc, best_step, best_state = acc, done, _state_cpu(method.eval_model(model))
                if log_metrics is not None and rank == 0:
                    log_metrics({k: v for k, v in record.items() if k != "step" and not math.isnan(v)}, done)
            if (resume_path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0
                    and done < cfg.steps and rank == 0):
                with atomic_path(resume_path) as tmp:
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                                "method": method.state_dict(), "step": done, "best_acc": best_acc, "best_step": best_step,
                                "best_state": best_state, "history": history, "fingerprint": fingerprint}, tmp)
    if world > 1:
        torch.distributed.barrier()
    for tower in relaid:
        tower.to(memory_format=torch.contiguous_format)
    final = copy.deepcopy(method.eval_model(model)).cpu().to(memory_format=torch.contiguous_format).eval()
    if best_state is not None:
        final.load_state_dict(best_state)
    if resume_path is not None and rank == 0 and end == cfg.steps:
        resume_path.unlink(missing_ok=True)
    return FineTuneResult(final, best_step, best_acc, history, time.perf_counter() - t0, end - start, step_times,
                          prep_times)


def _feature_batches(cached: torch.Tensor, labels: torch.Tensor, seed: int, start: int, stop: int,
                     batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(cached features, labels) of each step's whole batch (LP: the same indices as image batches)."""
    for step in range(start, stop):
        idx = batch_indices(seed, step, labels.shape[0], batch_size)
        yield cached[idx.to(cached.device)], labels[idx]


def _ddp_forward(net: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits through the DDP wrapper (its forward registers the gradient all-reduce)."""
    features = {}

    def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        features["f"] = output

    handle = net.module.encoder.register_forward_hook(keep)
    try:
        logits = net(images)
    finally:
        handle.remove()
    return features["f"], logits


def config_from(params: dict[str, Any], where: str = "finetune") -> FineTuneConfig:
    fields = {f.name for f in dataclasses.fields(FineTuneConfig)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (allowed: {sorted(fields)})")
    return FineTuneConfig(**params)


def tuned_and_reference_timm(classifier: ImageClassifier) -> tuple[ImageClassifier, ImageClassifier, None]:
    """(tuned copy, frozen reference, no text side) of a timm classifier (a unimodal start point)."""
    model = copy.deepcopy(classifier)
    classifier.eval().requires_grad_(False)
    return model, classifier, None


def tuned_and_reference(clip: nn.Module, head: nn.Module) -> tuple[ImageClassifier, ImageClassifier, TextSide]:
    """(tuned classifier, frozen reference, text side) from a CLIP model and its zero-shot head.

    The tuned copy is made *before* anything is frozen; the text tower stays frozen and is only used
    through `TextSide.encode` (over the shortest context that holds the texts' EOT: exact for open_clip's
    causal towers, see `encode_random_texts`). The CLIP may stay on the CPU: `finetune` moves the
    text side to its device.
    """
    model = ImageClassifier(copy.deepcopy(clip.visual), copy.deepcopy(head))
    reference = ImageClassifier(clip.visual, head).eval()
    for p in clip.parameters():
        p.requires_grad_(False)

    @torch.no_grad()
    def encode(ids: torch.Tensor) -> torch.Tensor:
        device = next(clip.parameters()).device
        return F.normalize(encode_random_texts(clip, ids.to(device)).float(), dim=-1)

    # `module` = the whole CLIP: its visual tower is the reference's encoder, which the loop moves anyway
    return model, reference, TextSide(encode=encode, tokenize=None, module=clip)
