"""Test utilities: real services started on free ports, clients, fault injection."""
