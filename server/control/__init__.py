"""Who may call, how many at once, and where a request goes (keys, admission, routing, replicas)."""
