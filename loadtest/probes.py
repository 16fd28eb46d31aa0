"""What the load generator reads from the serving side: the gateway's `/stats` and processes' memory.

Memory is the resident set (RSS) of the gateway process (the one listening on the target's
port) and of vLLM (the process listening on vLLM's port, with its engine child processes).
Found through `psutil` when the target is on this machine, or given as PIDs; for a remote
target it is "not measured (remote target)".
"""

from __future__ import annotations

import ipaddress
import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import psutil

MIB = 1024 * 1024


def fetch_stats(target: str, window_s: float | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
    """The gateway's `/stats` (optionally `?window=`); on failure `{"error": reason}`."""
    url = f"{target.rstrip('/')}/stats" + (f"?window={max(1, round(window_s))}" if window_s else "")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"error": f"GET {url}: {exc}"}


def is_local(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    local = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return any(ipaddress.ip_address(a).is_loopback or a in local for a in addresses)


def listening_pid(port: int) -> int | None:
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except (psutil.AccessDenied, PermissionError):
        return None
    return None


@dataclass
class ProcessWatch:
    """One served process to sample: `pid` (with its children when `tree`), or why it is not measured."""

    name: str
    pid: int | None
    tree: bool
    reason: str | None = None

    def rss_mib(self) -> float | None:
        if self.pid is None:
            return None
        try:
            process = psutil.Process(self.pid)
            processes = [process, *(process.children(recursive=True) if self.tree else [])]
            total = 0
            for proc in processes:
                try:
                    total += proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            return round(total / MIB, 2)
        except (psutil.NoSuchProcess, psutil.AccessDenied) as exc:
            self.reason = f"process {self.pid} unreadable: {exc.__class__.__name__}"
            self.pid = None
            return None

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "includes_children": self.tree, "reason": self.reason}


def watch_processes(
    target: str, vllm_url: str | None, gateway_pid: int | None = None, vllm_pid: int | None = None
) -> list[ProcessWatch]:
    """The gateway's and vLLM's processes, from the given PIDs or found by their listening ports."""
    watches = []
    # `student serve` runs vLLM as its child, so the gateway counts alone and vLLM with its children.
    for name, url, pid, tree in (("gateway", target, gateway_pid, False), ("vllm", vllm_url, vllm_pid, True)):
        if pid is not None:
            watches.append(ProcessWatch(name, pid, tree))
        elif not url:
            watches.append(ProcessWatch(name, None, tree, "not measured (URL unknown)"))
        elif not is_local(url):
            watches.append(ProcessWatch(name, None, tree, "not measured (remote target)"))
        else:
            port = urlsplit(url).port or (443 if url.startswith("https") else 80)
            found = listening_pid(port)
            reason = None if found else f"not measured (no readable process listens on port {port}; pass --{name}-pid)"
            watches.append(ProcessWatch(name, found, tree, reason))
    return watches
