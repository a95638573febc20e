"""labelmill: batch image classification over object storage with a served model.

This package holds what the producer, the workers and the serving tier share:
settings, storage URIs, the Redis job ledger, the result record and errors.
"""

__version__ = "0.1.0"
