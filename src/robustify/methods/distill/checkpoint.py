"""Student directories: what a partial-tuning run saves and how evaluation rebuilds it.

The frozen prefix is the pre-trained tower itself, so a student directory holds only the tunable part
(`student.safetensors`: shared section + heads) and names the zero-shot classifier it started from;
loading rebuilds the split from that classifier and checks that every tunable tensor is present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustify.io import load_safetensors, read_json, save_safetensors, write_json
from robustify.methods.distill.method import HeadView
from robustify.methods.distill.student import ThreeHeadStudent, split_tower

HEAD_TYPE = "student"


def save_student(out_dir: str | Path, student: ThreeHeadStudent, base: dict[str, Any], zeroshot: str | Path,
                 spec: dict[str, Any], info: dict[str, Any]) -> None:
    """`student.safetensors` + `classifier.json` (the base CLIP's family/arch/checkpoint, the zero-shot
    classifier directory and the split `spec`: fraction_tuned, head_fraction, dropout, heads,
    classifier_trainable)."""
    out_dir = Path(out_dir)
    state = {k: v.contiguous() for k, v in student.trainable_state().items()}
    save_safetensors(out_dir / "student.safetensors", state)
    keep = {k: base[k] for k in ("family", "arch", "checkpoint", "train_dataset", "classes") if k in base}
    write_json(out_dir / "classifier.json", {**keep, **info, "head_type": HEAD_TYPE, "weights": "student.safetensors",
                                             "zeroshot": str(zeroshot), "student": spec})


def is_student_dir(clf_dir: str | Path) -> bool:
    return read_json(Path(clf_dir) / "classifier.json").get("head_type") == HEAD_TYPE


def load_student(clf_dir: str | Path) -> tuple[HeadView, dict[str, Any]]:
    """(HeadView of the combined head — `.student` is the whole student, `.tower` its image tower — and
    classifier.json)."""
    from robustify.models.zeroshot import load_classifier

    clf_dir = Path(clf_dir)
    info = read_json(clf_dir / "classifier.json")
    for key in ("zeroshot", "student", "weights"):
        if key not in info:
            raise ValueError(f"{clf_dir / 'classifier.json'}: missing key '{key}' of a student directory")
    spec = info["student"]
    base, _ = load_classifier(info["zeroshot"])
    split = split_tower(base.encoder, spec["fraction_tuned"], spec["head_fraction"])
    student = ThreeHeadStudent(split, base.head, spec["dropout"], spec["classifier_trainable"], spec["heads"])
    state = load_safetensors(clf_dir / info["weights"])
    try:
        missing, unexpected = student.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when not strict
        raise ValueError(f"{clf_dir / info['weights']}: does not match the student of {info['zeroshot']}: {e}") from e
    missing = [k for k in missing if not k.startswith("prefix.")]
    if missing or unexpected:
        raise ValueError(f"{clf_dir / info['weights']}: does not match the student of {info['zeroshot']} "
                         f"(missing {missing[:5]}, unexpected {list(unexpected)[:5]})")
    return HeadView(student.eval(), "combined", base.encoder).eval(), info
