"""The offline fused store: a corpus's fused targets written once, read by any number of runs.

``fuseserve export`` asks the aligner for the fused targets of every block of a corpus (the blocks
a ``fuseserve train`` run with the same settings trains on) and writes them as parquet shards
with a manifest; ``fuseserve train --fused-from DIR`` and ``fuseserve.integrations.hf`` read them
back with no teacher or aligner running, and ``datasets.load_dataset("parquet", ...)`` reads them
without fuseserve.

Modules: ``config`` (the export's settings, shared field by field with ``TrainConfig``),
``shards`` (the parquet layout of one shard), ``manifest`` (what the store was made from, and the
check that a run matches it), ``export`` (writing a store, resumable), ``reader`` (fused blocks
out of a store, for the trainer and the collator), ``dataset`` (the store as a Hugging Face
``Dataset``).
"""
