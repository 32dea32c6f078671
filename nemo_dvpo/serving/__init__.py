"""Serving frozen models over HTTP: the GVM server and client (Open Inference Protocol / KServe v2)."""
