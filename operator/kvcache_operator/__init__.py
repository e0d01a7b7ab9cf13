"""kvcache_operator: a Kopf operator that runs KV cache engines on Kubernetes."""

__version__ = "0.1.0"
