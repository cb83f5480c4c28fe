"""fuseserve's fused targets in other training frameworks.

``hf``: a collator and a ``transformers.Trainer`` subclass that train on λ·CLM + (1−λ)·fusion with
fused targets from a store or from the aligner.
"""
