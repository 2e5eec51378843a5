"""Runs that write files: they call the in-memory pipelines and write NIfTI, JSON and PNG files, atomically.

``generate`` (prompts or masks -> pairs, resumable), ``synthesize`` (a segmentation data set, nnU-Net or MONAI
layout), ``tcss`` / ``mask_to_ct`` / ``autoencoder`` (the stage bundles' inference outputs), ``latent_cache`` (the
latent generator's training latents) and ``untrained`` (random-weight model files for tests and benchmarks). Import
the module you need: this package imports none of them, so loading one run does not load the others.
"""
