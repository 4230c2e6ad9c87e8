"""Observability: request ids, JSON logs, Prometheus metrics and container health probes."""
