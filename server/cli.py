"""`cacheblend serve`: load the model and serve the OpenAI-compatible API with uvicorn.

One uvicorn worker, always: the engine owns the model, its KV store and the running batch in
this process, and a second worker would load a second model that shares none of them.
Capacity scales by replicas behind a load balancer (see docker/), sharing chunk KV through
the Redis/S3 tiers. SIGHUP reloads the API keys file (`api_keys_file`) without a restart.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
from typing import Optional

import uvicorn

from config import add_settings_flags, load_settings
from config.settings import Settings
from server.app import build_app


class JSONFormatter(logging.Formatter):
    """One JSON object per log line (for log collectors)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        if getattr(record, "request_id", None):
            line["request_id"] = record.request_id
        if getattr(record, "tenant", None):
            line["tenant"] = record.tenant
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible API (one process owns the model)")
    add_settings_flags(p)
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may take to finish on SIGTERM before they are cancelled")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    configure_logging(settings)
    server: Optional[uvicorn.Server] = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = build_app(settings, on_fatal=stop)
    # uvicorn handles SIGINT and SIGTERM only; the handler runs on the main thread between
    # bytecodes, and a reload swaps the table in one assignment.
    signal.signal(signal.SIGHUP, lambda *_: app.state.tenants.reload())
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = uvicorn.Server(config)
    server.run()
    return 1 if app.state.runtime.load_error else 0
