"""The aligner: a pure core (tokenview, vocabmap, alignment, projection, fusion), adapters."""
