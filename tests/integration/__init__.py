"""Integration tests: run against the real services started by `make services`."""
