"""fuseserve: knowledge fusion of LLMs (FuseLLM) as online services."""

__version__ = "0.1.0"
