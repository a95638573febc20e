"""Development tools, never imported by the producer, the workers or serving.

- ``python -m labelmill.dev.stack``: the local stack (Redis, SeaweedFS, a model
  server, workers, Flower) as processes;
- ``python -m labelmill.dev.demo``: a job on that stack, from a fresh machine;
- ``python -m labelmill.dev.cluster``: ``k8s/`` and ``keda/`` on one local node.
"""
