"""`python -m bench.twilio_server PORT`: the fake Twilio REST API in its own process, so the
relay's outbound sends do not share a core with the load generator."""

from __future__ import annotations

import sys

import uvicorn

from fakes.twilio import FakeTwilio
from fakes.wiring import ACCOUNT_SID, AUTH_TOKEN

if __name__ == "__main__":
    uvicorn.run(FakeTwilio(ACCOUNT_SID, AUTH_TOKEN).app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
