"""The aligner service fixtures live in tests/service_fixtures.py (shared with the trainer)."""
