"""Training methods: mini-world CLIP pre-training (fine-tuning, post-hoc and distillation follow)."""
