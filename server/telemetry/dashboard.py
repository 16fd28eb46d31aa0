"""GET /dashboard: one offline page that polls /stats and draws live charts.

The page and its assets live in `server/telemetry/static/` (plain JS, uPlot vendored, no build step) and are
read once at import; nothing on the page loads from outside the gateway.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import PurePosixPath

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from server.gateway.errors import error_response

_STATIC = files("server.telemetry") / "static"
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


def _read_assets() -> dict[str, tuple[bytes, str]]:
    """Every servable file under static/ by its relative path: (content, media type)."""
    assets: dict[str, tuple[bytes, str]] = {}
    pending = [("", _STATIC)]
    while pending:
        prefix, folder = pending.pop()
        for entry in folder.iterdir():
            name = f"{prefix}{entry.name}"
            if entry.is_dir():
                pending.append((f"{name}/", entry))
            elif (suffix := PurePosixPath(entry.name).suffix) in _MEDIA_TYPES:
                assets[name] = (entry.read_bytes(), _MEDIA_TYPES[suffix])
    return assets


_ASSETS = _read_assets()
_PAGE = _ASSETS.pop("dashboard.html")[0].decode()

router = APIRouter()


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(_PAGE, headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/static/{name:path}")
async def dashboard_asset(name: str) -> Response:
    if name not in _ASSETS:
        return error_response(404, f"no dashboard asset {name!r}")
    content, media_type = _ASSETS[name]
    return Response(content, media_type=media_type, headers={"Cache-Control": "no-cache"})
