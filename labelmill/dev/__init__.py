"""Development tools: the local cluster that runs k8s/ and keda/ as processes."""
