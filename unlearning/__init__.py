"""Lethe's unlearning engine: datasets and sample stores, architectures, training, unlearning
methods, scenarios, membership-inference verification and the `lab` experiment runner.

Pure PyTorch + NumPy + scikit-learn; imports nothing from ``app`` or ``worker``. See
``unlearning/README.md`` for the module map and the entry points the worker calls.
"""
