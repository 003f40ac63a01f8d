"""The registered fine-tuning methods beyond plain FT, one small module each (SPEC §2).

Importing this package registers them with `robustify.methods.finetune.METHODS`.
"""

from robustify.methods.regularizers import car_ft, distill, ema, l2sp, linear_probe, lipsum  # noqa: F401
