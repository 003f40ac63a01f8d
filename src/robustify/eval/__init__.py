"""Evaluation: metrics and the model × eval-set evaluation job."""
