"""Data augmentations that robustify small teachers (issue #6, SPEC §3): AugMix with its JSD consistency
loss, DeepAugment (EDSR / CAE with randomly perturbed weights and activations, and the weight-free
Noise2Net), and PixMix with its mixing set. Every random draw comes from a generator the caller passes,
so a run is reproducible from its seed."""
