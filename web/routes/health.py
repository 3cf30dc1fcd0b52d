from __future__ import annotations

from quart import Blueprint, jsonify

from ..api import route, runtime
from ..schemas import Health, RuntimeInfo

bp = Blueprint("health", __name__)


@route(bp, "/health", "GET", summary="Liveness check (no auth)", response=Health, public=True)
async def health():
    return jsonify({"status": "ok", "service": "trio-runtime", "mode": "local"})


@route(bp, "/v1/runtime/info", "GET", summary="Version, data dir, backend, uptime, live engines",
       response=RuntimeInfo)
async def info():
    return jsonify(runtime().info())
