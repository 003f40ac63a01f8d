"""Model loading (open_clip from configs and local checkpoints), zero-shot heads, classifiers."""
