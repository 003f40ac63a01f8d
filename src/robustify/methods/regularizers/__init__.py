"""The registered fine-tuning methods beyond plain FT, one small module each (SPEC §2).

Importing this package registers them with `robustify.methods.finetune.METHODS`.
"""

from robustify.methods.regularizers import car_ft, distill, ema, l2sp, linear_probe, lipsum, vpt, zs_ft  # noqa: F401
from robustify.methods.regularizers import robust_teacher  # noqa: F401,E402  (the teachers stage)
from robustify.methods.distill import method as _distill_methods  # noqa: F401,E402  (the distill stage)
