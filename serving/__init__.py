"""The serving tier: export Inception-v3 for TF Serving, its config, and ``serving local``."""
