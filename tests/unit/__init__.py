"""Unit tests: pure logic, no services."""
