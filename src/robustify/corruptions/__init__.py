"""ImageNet-C corruptions (fast engine + reference wrapper), names, and the corrupted-dataset builder.

Importing the package stays light: the engines (numba, OpenCV, scikit-image) load on first `corrupt`.
"""

from robustify.corruptions.engine import (
    ALL_CORRUPTIONS,
    CORRUPTIONS,
    ENGINES,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    corrupt,
)

__all__ = ["ALL_CORRUPTIONS", "CORRUPTIONS", "ENGINES", "EXTRA_CORRUPTIONS", "SEVERITIES", "corrupt"]
