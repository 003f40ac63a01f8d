"""Efficiently Robustify Pre-Trained Models (SPEC §3): the three-head student (`student`), its
training losses (`losses`) and uncertainty-aware head selection at inference (`selection`)."""
