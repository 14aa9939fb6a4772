"""Chaos scenarios: faults injected into a real server, NATS, database and workers."""
