"""The partial-tuning methods of "Efficiently Robustify Pre-Trained Models" as registered fine-tuning
methods (SPEC §3): ours (`three-head`), its ablation `three-head-no-kd` (App. A "Ours w/o K.D."), and
the baselines `single-teacher`, `only-kd`, `combined-head` and `apt` (§5). They run in the one
fine-tuning loop through its hooks:

- `setup` builds the student around the classifier: frozen prefix, shared section, three heads (or
  one head for the single-head baselines), dropout in the tunable part (`student.ThreeHeadStudent`),
  and loads the small robust teacher T_robust. The classifier is trainable in the visual-evaluation
  setup (a linear head on the tower) and frozen in the zero-shot setup (logits against the fixed
  prompt embeddings, paper §4.4).
- `prepare` turns a random fraction `a` of each batch (`losses.mix_batch`'s stochastic rounding) into
  augmented samples `D^a`: DeepAugment then AugMix by default (App. G), any `RobustRecipe`.
- `forward` runs the frozen prefix once without gradients, the shared section once, and each head
  only on the rows whose loss terms use it (clean head: clean rows, unclean head: augmented rows,
  combined: all), so no head computes logits nobody reads. With `cache_prefix` the clean rows'
  prefix features and T_clean logits come from `prefix_cache.PrefixCache`, filled in `setup` (paper
  §4.1's frozen backbone makes them constant; the recipe's `augment: none` keeps a clean row the same
  image every epoch). It also computes the teachers' logits on
  exactly the rows `losses.teacher_masks` names: T_clean, the frozen initial model, is the original
  trailing layers + head applied to the prefix features the student already computed (the prefix *is*
  the initial model's), so it costs a no-grad pass through the tuned fraction only; T_robust gets the
  images re-normalised (and resized) to its own input convention.
- `extra_loss` is the routed loss of Eqs. 3–5 (`losses.distill_loss`); the loop's own CE is off.
- `eval_model` is the combined head, used for the best-checkpoint choice on the validation split
  [choice: head selection needs MC passes; the combined head sees both branches]; the saved model
  is the whole student.

Adam with lr 1e-3 (App. G) is the loop's AdamW with weight decay 0 (the same update).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robustify.augment.robust import RobustRecipe, row_seeds
from robustify.methods.distill.losses import HEADS, VARIANTS, distill_loss, mix_batch, teacher_masks
from robustify.methods.distill.prefix_cache import PrefixCache
from robustify.methods.distill.student import ThreeHeadStudent, split_tower
from robustify.methods.finetune import Batch, FineTuneMethod, RunContext, StepInfo, TextSide, register
from robustify.methods.regularizers.robust_teacher import DEFAULT_AUGMENT, _step_seed, from_unit, to_unit
from robustify.models.zeroshot import ImageClassifier

SETUPS = ("visual", "zeroshot")
COMBINED = "combined"


class HeadView(nn.Module):
    """One head of a student as a plain classifier (validation, single-head students' evaluation).
    `student` is a submodule, so the state dict holds the whole student; `tower` (not a submodule) is
    the image tower whose eval transform the student's inputs go through."""

    def __init__(self, student: ThreeHeadStudent, head: str = COMBINED, tower: nn.Module | None = None) -> None:
        super().__init__()
        self.student, self.head = student, head
        self._tower = (tower,)

    @property
    def tower(self) -> nn.Module | None:
        return self._tower[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x, (self.head,))[self.head]


class TeacherInput(nn.Module):
    """T_robust on images normalised for the student: back to [0, 1], resized to the teacher's input size
    if it differs (bilinear, antialiased), normalised with the teacher's mean/std."""

    def __init__(self, teacher: nn.Module, student_mean: tuple[float, ...], student_std: tuple[float, ...]) -> None:
        super().__init__()
        pp = teacher.encoder.preprocess_cfg if isinstance(teacher, ImageClassifier) else {}
        if not pp:
            raise ValueError("the robust teacher must be a classifier directory with an image tower (preprocess_cfg)")
        self.teacher = teacher
        self.size = int(pp["size"] if isinstance(pp["size"], int) else pp["size"][-1])
        self.register_buffer("s_mean", torch.tensor(student_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("s_std", torch.tensor(student_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("t_mean", torch.tensor(pp["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("t_std", torch.tensor(pp["std"]).view(1, -1, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.s_std + self.s_mean
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.teacher((x - self.t_mean) / self.t_std)


class _Tail(nn.Module):
    """The initial model after the prefix: original tunable layers + post + original head (T_clean)."""

    def __init__(self, layers: tuple[nn.Module, ...], post: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.layers, self.post, self.head = nn.Sequential(*layers), post, head

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.post(self.layers(features)))


class PartialTuning(FineTuneMethod):
    """Base of the partial-tuning family; the subclass names its loss variant (`losses.VARIANTS`)."""

    variant: ClassVar[str] = "three-head"
    ce_on_logits: ClassVar[bool] = False

    def __init__(self, fraction_tuned: float = 0.1, head_fraction: float = 0.2, dropout: float = 0.25,
                 a: float = 0.5, temperature: float = 1.0, teacher: str | None = None,
                 teacher_name: str | None = None, augment: dict[str, Any] | None = None,
                 setup: str = "visual", cache_prefix: bool = False) -> None:
        spec = VARIANTS[self.variant]
        if setup not in SETUPS:
            raise ValueError(f"method '{self.name}': setup must be one of {SETUPS}, got '{setup}'")
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"method '{self.name}': a (fraction of augmented samples) must be in [0, 1], got {a}")
        if temperature <= 0:
            raise ValueError(f"method '{self.name}': temperature must be > 0, got {temperature}")
        uses_teacher = "robust" in (spec.clean_teacher, spec.aug_teacher)
        if uses_teacher and not teacher:
            raise ValueError(f"method '{self.name}' distils from a robust teacher: give params.teacher "
                             "(a teacher classifier directory, models/teachers/<name>)")
        self.fraction_tuned, self.head_fraction, self.dropout = float(fraction_tuned), float(head_fraction), float(dropout)
        if not isinstance(cache_prefix, bool):
            raise ValueError(f"method '{self.name}': cache_prefix must be true or false, got {cache_prefix!r}")
        self.a, self.temperature, self.setup_kind = float(a), float(temperature), setup
        self.cache_prefix = cache_prefix
        self.cache: PrefixCache | None = None
        self.clean_logits: torch.Tensor | None = None  # T_clean's logits of every clean training row
        self.cache_seconds = 0.0  # the one pass that fills both, outside the per-step cost (as LP's features)
        self.teacher_dir = teacher if uses_teacher else None
        self.teacher_name = teacher_name if uses_teacher else None
        self.recipe = RobustRecipe.from_params(DEFAULT_AUGMENT if augment is None else augment, f"{self.name}.augment")
        self.heads = HEADS if spec.three_heads else (COMBINED,)
        self.student: ThreeHeadStudent | None = None
        self.tail: _Tail | None = None
        self.robust: TeacherInput | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {"fraction_tuned": self.fraction_tuned, "head_fraction": self.head_fraction, "dropout": self.dropout,
                "a": self.a, "temperature": self.temperature, "teacher": self.teacher_name,
                "augment": self.recipe.params, "setup": self.setup_kind,
                **({"cache_prefix": True} if self.cache_prefix else {})}  # absent when off: old run ids stay

    # ------------------------------------------------------------------------------------ hooks
    def setup(self, model: ImageClassifier, run: RunContext) -> nn.Module:
        split = split_tower(model.encoder, self.fraction_tuned, self.head_fraction)
        student = ThreeHeadStudent(split, model.head, self.dropout, self.setup_kind == "visual", self.heads)
        self.student = student.to(run.device)
        if self.cache_prefix:
            if run.cfg.augment != "none":
                raise ValueError(f"method '{self.name}': cache_prefix needs the recipe's augment: none (a cached "
                                 f"clean row must be the same image every epoch), got augment: {run.cfg.augment}")
            t0 = time.perf_counter()
            self.cache = PrefixCache.fill(self.student.features, run.train.batches(run.cfg.eval_batch_size, run.device),
                                          len(run.train))
        spec = VARIANTS[self.variant]
        if "clean" in (spec.clean_teacher, spec.aug_teacher):
            # the tower's own trailing layers are θ0 (the student tunes deep copies of them)
            self.tail = _Tail(split.view.layers[split.n_frozen:], split.view.post, model.head).to(run.device).eval()
            self.tail.requires_grad_(False)
            if self.cache is not None:  # T_clean on a clean image is a constant too: its logits, once
                store = self.cache.store
                self.clean_logits = torch.cat([self.tail(store[i:i + run.cfg.eval_batch_size].to(run.device)).cpu()
                                               for i in range(0, len(store), run.cfg.eval_batch_size)])
        if self.cache is not None:
            self.cache_seconds = time.perf_counter() - t0
        if self.teacher_dir is not None:
            from robustify.models.zeroshot import load_classifier

            teacher, _ = load_classifier(self.teacher_dir)
            self.robust = TeacherInput(teacher, tuple(run.train.mean), tuple(run.train.std)).to(run.device).eval()
            self.robust.requires_grad_(False)
        return self.student

    def prepare(self, images: torch.Tensor, labels: torch.Tensor, info: StepInfo) -> tuple[torch.Tensor, dict[str, Any]]:
        gen = info.generator(0)
        _, mask = mix_batch(torch.zeros(info.total, 1), torch.zeros(info.total, 1), self.a, gen)
        mask = mask[info.first:info.first + len(images)]
        rows = mask.nonzero().squeeze(1)
        if rows.numel():
            seeds = row_seeds(_step_seed(info, 1), info.first, len(images))
            x = self.recipe.deep(to_unit(images[rows.to(images.device)], info), info.generator(2))
            x = self.recipe.mix(x, [seeds[i] for i in rows.tolist()])
            images = images.clone()
            images[rows.to(images.device)] = from_unit(x, info).to(images.dtype)
        indices = info.indices(len(images)) if self.cache is not None else None
        return images, {"augmented": mask.to(images.device), "indices": indices}

    def forward(self, net: nn.Module, images: torch.Tensor, extras: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        student = self.student
        aug = extras["augmented"]
        if self.cache is not None and net is student:
            if extras.get("indices") is None:
                raise ValueError(f"method '{self.name}': cache_prefix needs the rows' dataset indices (StepInfo.indices)")
            features = self.cache.features(student.features, images, extras["indices"], ~aug.cpu())
        else:  # DDP: the wrapper's forward below recomputes every row anyway
            features = student.features(images)
        masks = teacher_masks(self.variant, aug)
        if masks["clean"] is not None:
            extras["clean_teacher"] = self._clean_teacher(features, masks["clean"], aug, extras.get("indices"))
        if masks["robust"] is not None:
            extras["robust_teacher"] = self.robust(images[masks["robust"]])
        if net is not student:  # DDP: the wrapper's forward registers the gradient reduction (all heads, all rows)
            logits = net(images)
        else:
            z = student.shared(features)
            rows = {"clean": ~aug, "unclean": aug, COMBINED: None}
            logits = {h: _rows_only(student.heads[h], z, rows[h]) for h in self.heads}
        return features, logits if len(self.heads) > 1 else logits[COMBINED]

    def _clean_teacher(self, features: torch.Tensor, rows: torch.Tensor, aug: torch.Tensor,
                       indices: torch.Tensor | None) -> torch.Tensor:
        """T_clean's logits on `rows`: clean rows from `clean_logits` when cached, the rest computed."""
        if self.clean_logits is None or indices is None:
            return self.tail(features[rows])
        sub = rows.nonzero().squeeze(1)
        stored = ~aug[sub]
        out = self.clean_logits[indices[sub[stored].cpu()]].to(features.device)
        if bool((~stored).any()):
            full = out.new_empty((sub.numel(), out.shape[1]))
            full[stored] = out
            full[~stored] = self.tail(features[sub[~stored]]).to(out.dtype)
            out = full
        return out

    def extra_loss(self, batch: Batch, model: nn.Module, text: TextSide | None) -> tuple[torch.Tensor, dict[str, float]]:
        return distill_loss(self.variant, batch.logits, batch.labels, batch.extras["augmented"],
                            batch.extras.get("clean_teacher"), batch.extras.get("robust_teacher"), self.temperature)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return HeadView(model, COMBINED)


def _rows_only(head: nn.Module, z: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """head(z) on the selected rows, scattered into a zero tensor of the whole batch (the loss reads only
    those rows); all rows when `rows` is None."""
    if rows is None:
        return head(z)
    idx = rows.nonzero().squeeze(1)
    out = head(z[idx])
    full = out.new_zeros((z.shape[0], out.shape[1]))
    return full.index_copy(0, idx, out)


def _variant_method(method: str, variant: str, doc: str) -> type[PartialTuning]:
    cls = type(method.title().replace("-", ""), (PartialTuning,), {"name": method, "variant": variant, "__doc__": doc})
    return register(cls)


ThreeHead = _variant_method("three-head", "three-head", "Ours: three heads, routed CE + KD from T_clean / T_robust (Eqs. 3–5).")
ThreeHeadNoKD = _variant_method("three-head-no-kd", "three-head-no-kd", "App. A 'Ours w/o K.D.': three heads, routed CE only.")
SingleTeacher = _variant_method("single-teacher", "single-teacher", "Three heads, KD from T_robust only (`losses.single_teacher_loss`).")
OnlyKD = _variant_method("only-kd", "only-kd", "§5 Only K.D.: one head, CE + KD from T_robust on every sample.")
CombinedHead = _variant_method("combined-head", "combined-head", "§5 Combined head: one head, KD from T_clean (clean) and T_robust (augmented).")
APT = _variant_method("apt", "apt", "§5 APT: the same tunable layers, one head, CE on clean + augmented samples.")
