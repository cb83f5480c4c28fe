"""The trainer: a Ray Train job that trains the target on CLM + fusion losses, fused targets online.

Modules: ``loss`` (sparse fusion loss, pure torch), ``data`` (corpus -> packed text blocks),
``prefetch`` (fused targets streamed from the aligner into a bounded queue), ``config``,
``loop`` (the per-worker training function), ``job`` (TorchTrainer assembly), ``evaluate`` (BPB).
"""
