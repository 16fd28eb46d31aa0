"""The gateway: the request path from the client's socket to vLLM and back (app, endpoints, proxy)."""
