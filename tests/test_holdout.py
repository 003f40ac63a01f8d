"""The held-out split carved at prepare time: stratified, seeded by path (order-free), disjoint."""

from __future__ import annotations

import pandas as pd
import pytest

from robustify.data.prepare import hold_out


def _manifest(n_per_class: int = 50) -> pd.DataFrame:
    rows = [{"path": f"/d/{dom}/{c}/{i}.jpg", "label": c, "split": "train", "domain": dom}
            for dom in ("real", "sketch") for c in range(4) for i in range(n_per_class)]
    rows += [{"path": f"/d/real/{c}/t{i}.jpg", "label": c, "split": "test", "domain": "real"}
             for c in range(4) for i in range(5)]
    return pd.DataFrame(rows)


def test_holdout_is_stratified_disjoint_and_independent_of_order():
    m = _manifest()
    out = hold_out(m, "train", "val", 0.1, seed=3)
    val = out[out["split"] == "val"]
    assert len(val) == 2 * 4 * 5 and val.groupby(["domain", "label"]).size().eq(5).all()
    assert set(out.loc[out["split"] == "test", "path"]) == set(m.loc[m["split"] == "test", "path"])
    assert len(out) == len(m) and out["path"].is_unique
    shuffled = hold_out(m.sample(frac=1, random_state=0), "train", "val", 0.1, seed=3)
    assert set(shuffled.loc[shuffled["split"] == "val", "path"]) == set(val["path"])
    other = hold_out(m, "train", "val", 0.1, seed=4)
    assert set(other.loc[other["split"] == "val", "path"]) != set(val["path"])


def test_holdout_refuses_bad_input():
    with pytest.raises(ValueError, match="no 'dev' split"):
        hold_out(_manifest(), "dev", "val", 0.1)
    with pytest.raises(ValueError, match="split 'test' already exists"):
        hold_out(_manifest(), "train", "test", 0.1)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        hold_out(_manifest(), "train", "val", 1.5)
