"""Measuring: power sources, energy attribution per request, request records, /stats, /metrics, the dashboard."""
