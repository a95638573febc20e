"""A local cluster: the manifests in ``k8s/`` and ``keda/`` run as local processes.

``python -m labelmill.dev.cluster up --dir DIR`` reads the Deployments,
StatefulSet, ConfigMaps, Secrets, Services, ScaledObjects and the
TriggerAuthentication, starts a SeaweedFS S3 gateway in place of the cloud
bucket, publishes the model where the TF Serving init container pulls it,
and then runs every pod's containers with their own command, args and env,
as the kubelet would: init containers, probes, restarts with back-off,
graceful termination. Services are local TCP proxies over ready pods.
What is substituted for what is in :mod:`labelmill.dev.cluster.substitutions`.
"""
