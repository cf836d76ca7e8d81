"""The data stage: files, the RLE codec, layouts and records, subject-grouped splits, the inspector, decoded
samples, intensity normalisation and the augmentations (Albumentations on the CPU, batches on the device).

It knows nothing of training or inference.
"""
