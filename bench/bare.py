"""The references: a bare uvicorn + Starlette app that parses the same form and answers health.

`python -m bench.bare PORT [PARSER]` serves it with uvicorn's defaults and the HTTP parser of
the process it stands beside: `httptools` for the relay, `h11` for the worker.
"""

from __future__ import annotations

import sys
from urllib.parse import parse_qsl

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response />'


async def webhook(request: Request) -> Response:
    dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
    return Response(TWIML, media_type="text/xml")


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/webhook", webhook, methods=["POST"]), Route("/health", health)])

if __name__ == "__main__":
    parser = sys.argv[2] if len(sys.argv) > 2 else "auto"
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", http=parser)
