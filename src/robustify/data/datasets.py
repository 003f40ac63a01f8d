"""Built-in datasets. Each class is the whole definition of one dataset."""

from __future__ import annotations

from robustify.data.registry import Dataset, register


@register
class MiniWorld(Dataset):
    """The generated embedded world (see `robustify.data.miniworld`); domains are a manifest column."""

    name = "miniworld"
    required_columns = ("path", "label", "split", "domain", "caption")

# Real benchmarks: one module per family, each class registered on import.
import robustify.data.domainnet  # noqa: E402,F401
import robustify.data.folder  # noqa: E402,F401
import robustify.data.objectnet  # noqa: E402,F401
import robustify.data.imagenet  # noqa: E402,F401
