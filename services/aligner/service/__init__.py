"""The aligner service: thin adapters (settings, teacher pool, cache, REST, gRPC) around the core.

Nothing here is imported by the core modules of ``fuseserve.aligner``.
"""
