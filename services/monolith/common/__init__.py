"""Shared server runtime: server factory, error-to-status mapping, wire arrays, metrics."""
