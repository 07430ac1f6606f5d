"""Relay benchmarks: webhook throughput and latency, wake overhead, first reply, relay memory."""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path

import anyio
import httpx
from twilio.request_validator import RequestValidator

from bench import loadgen
from bench.common import CpuMeter, emit, median, pct, process, rss_kb, until_healthy
from common.serve import Listening
from fakes.servers import reserve_port, reserve_port_at, run_server, url_of
from fakes.twilio import FakeTwilio
from fakes.wiring import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, WORKER_TOKEN, message_params, relay_env
from fakes.worker import FakeWorker

PHONES = [f"+1555200{i:04d}" for i in range(120)]
BARE = "bare Starlette form parse"


async def until_healthy_port(port: int, proc: object) -> None:
    """The fake Twilio has no /health: wait until its port accepts connections."""
    with anyio.fail_after(30):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.01)
                continue
            await stream.aclose()
            return


def relay_process_env(tmp: Path, twilio_url: str, worker_url: str, port: int, **extra: str) -> dict[str, str]:
    return relay_env(
        tmp / "relay.sqlite3",
        twilio_url,
        worker_url,
        PORT=str(port),
        HOST="127.0.0.1",
        ALLOWED_PHONE_NUMBERS=",".join(PHONES),
        LOG_LEVEL="WARNING",
        **extra,
    )


def signed_requests(port: int, count: int, body: str = "help", sender: str = "") -> list[bytes]:
    """Signed webhooks from 20 allowlisted numbers (or `sender`), each with its own MessageSid."""
    validator = RequestValidator(AUTH_TOKEN)
    requests = []
    for i in range(count):
        params = message_params(body, sender=sender or PHONES[i % 20])
        signature = validator.compute_signature(PUBLIC_URL + "/webhook", params)
        requests.append(
            loadgen.form_request(f"127.0.0.1:{port}", "/webhook", params, {"X-Twilio-Signature": signature})
        )
    return requests


def free_port() -> int:
    sock = reserve_port()
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def webhook_and_memory(tmp: Path, count: int = 4000, concurrency: int = 32) -> None:
    """Signed "help" messages (each answered through the fake Twilio, in its own process)."""
    twilio_port, bare_port, relay_port = free_port(), free_port(), free_port()
    with process(["-m", "bench.twilio_server", str(twilio_port)], {}, tmp / "twilio.log") as twilio:
        await until_healthy_port(twilio_port, twilio)
        # The reference parses HTTP with the relay's parser, so the ratio is the relay's own work.
        with process(["-m", "bench.bare", str(bare_port), "httptools"], {}, tmp / "bare.log") as bare:
            await until_healthy(f"http://127.0.0.1:{bare_port}", bare)
            await loadgen.run("127.0.0.1", bare_port, signed_requests(bare_port, 300), concurrency)
            with CpuMeter(bare.pid) as bare_cpu:
                bare_rps, bare_lat = await loadgen.run(
                    "127.0.0.1", bare_port, signed_requests(bare_port, count), concurrency
                )
        env = relay_process_env(tmp, f"http://127.0.0.1:{twilio_port}", "http://127.0.0.1:9", relay_port)
        with process(["-m", "relay"], env, tmp / "relay.log") as relay:
            await until_healthy(f"http://127.0.0.1:{relay_port}", relay)
            idle_kb = rss_kb(relay.pid)
            await loadgen.run("127.0.0.1", relay_port, signed_requests(relay_port, 300), concurrency)
            await until_replies_sent(tmp / "relay.sqlite3", 300)
            with CpuMeter(relay.pid, twilio.pid) as cpu:
                began = time.perf_counter()
                rps, lat = await loadgen.run("127.0.0.1", relay_port, signed_requests(relay_port, count), concurrency)
                # The webhook answers before the reply is sent: the run is over when every reply is.
                await until_replies_sent(tmp / "relay.sqlite3", 300 + count)
                answered_rps = count / (time.perf_counter() - began)
            peak_kb = rss_kb(relay.pid, "VmHWM")
            # The route alone: a sender outside the allowlist is checked and answered, no more.
            route_rps, route_lat = await loadgen.run(
                "127.0.0.1", relay_port, signed_requests(relay_port, count, sender="+19990000000"), concurrency
            )
    emit(
        "webhook",
        "throughput",
        rps,
        "req/s",
        reference=bare_rps,
        reference_name=BARE,
        target=">= 0.5x bare",
        met=rps >= 0.5 * bare_rps,
        concurrency=concurrency,
        requests=count,
        note="webhooks acknowledged; their replies may still be going out",
    )
    emit(
        "webhook",
        "answered_throughput",
        answered_rps,
        "msg/s",
        reference=bare_rps,
        reference_name=BARE,
        note="from the first webhook until every reply reached the fake Twilio",
        cpu_us_per_msg={
            "relay": round(cpu.seconds[0] / count * 1e6),
            "fake_twilio": round(cpu.seconds[1] / count * 1e6),
            "bare_server": round(bare_cpu.seconds[0] / count * 1e6),
        },
    )
    p99 = pct(lat, 99) * 1000
    emit("webhook", "p50_latency", pct(lat, 50) * 1000, "ms", reference=pct(bare_lat, 50) * 1000, reference_name=BARE)
    emit(
        "webhook",
        "p99_latency",
        p99,
        "ms",
        reference=pct(bare_lat, 99) * 1000,
        reference_name=BARE,
        target="< 20 ms",
        met=p99 < 20,
    )
    emit(
        "webhook",
        "route_only_throughput",
        route_rps,
        "req/s",
        reference=bare_rps,
        reference_name=BARE,
        note="signature + parse + allowlist, nothing stored or sent",
    )
    route_p99 = pct(route_lat, 99) * 1000
    emit("webhook", "route_only_p99_latency", route_p99, "ms", reference=pct(bare_lat, 99) * 1000, reference_name=BARE)
    emit(
        "memory",
        "relay_peak_rss",
        peak_kb / 1024,
        "MB",
        reference=idle_kb / 1024,
        reference_name="relay idle",
        target="< 80 MB",
        met=peak_kb / 1024 < 80,
    )


async def until_replies_sent(db: Path, expected: int, timeout: float = 300) -> None:
    """Wait until the relay's outbox holds `expected` sent messages and nothing else; a reply
    that failed, or one that never goes out, fails the benchmark."""
    with anyio.fail_after(timeout), closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        while True:
            counts = dict(conn.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status").fetchall())
            if counts.get("failed"):
                raise RuntimeError(f"{counts['failed']} replies failed")
            if counts.get("sent", 0) >= expected and not counts.get("pending"):
                return
            await anyio.sleep(0.02)


async def wake_overhead(tmp: Path, trials: int = 20) -> None:
    """Wake waste: from the moment the woken worker listens to the moment `/command` reaches it.

    The worker starts listening after a random boot delay (the same delays for every variant):
    announcing itself the moment it listens, as the real one does (`worker_boot.announce_p95`
    is the real worker's own part); found by polling alone; and, as the reference, the original
    plan's poll every 3 s, measured the same way in the same run.
    """
    variants = [("announced", True, "60"), ("poll_only", False, "60"), ("poll_3s", False, "3000")]
    rng = random.Random(5)
    delays = [rng.uniform(0.3, 3.0) for _ in range(trials)]
    waste: dict[str, list[float]] = {}
    rates: dict[str, list[float]] = {}
    for name, announce, poll_ms in variants:
        waste[name], rates[name] = await _wake_trials(tmp, name, delays, announce=announce, poll_ms=poll_ms)
    reference = waste["poll_3s"]
    for name, target_ms in (("announced", 20), ("poll_only", 100)):
        p95 = pct(waste[name], 95) * 1000
        emit(
            "wake",
            f"{name}_waste_p95",
            p95,
            "ms",
            reference=pct(reference, 95) * 1000,
            reference_name="3 s poll",
            target=f"< {target_ms} ms",
            met=p95 < target_ms,
            trials=trials,
            mean_ms=round(sum(waste[name]) / trials * 1000, 1),
            max_ms=round(max(waste[name]) * 1000, 1),
        )
        emit(
            "wake",
            f"{name}_requests_per_s",
            max(rates[name]),
            "req/s",
            reference=max(rates["poll_3s"]),
            reference_name="3 s poll",
            target="<= 20 req/s",
            met=max(rates[name]) <= 20.5,
            note="the most health polls any trial sent the waking worker, from the webhook to the command",
        )


async def _wake_trials(
    tmp: Path, name: str, delays: list[float], *, announce: bool, poll_ms: str
) -> tuple[list[float], list[float]]:
    """Per trial: the wake waste, and the requests per second the relay sent the waking worker."""
    twilio = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN)
    waste, rates = [], []
    async with run_server(twilio.app()) as twilio_url:
        worker_port, relay_port = free_port(), free_port()  # after Twilio's, so neither is its port
        env = relay_process_env(
            tmp,
            twilio_url,
            f"http://127.0.0.1:{worker_port}",
            relay_port,
            WAKE_POLL_MS=poll_ms,
            RELAY_DB=str(tmp / f"wake-{name}.sqlite3"),  # a fresh relay per variant
        )
        with process(["-m", "relay"], env, tmp / f"wake-{name}.log") as relay:
            relay_url = f"http://127.0.0.1:{relay_port}"
            await until_healthy(relay_url, relay)
            async with httpx.AsyncClient() as client:
                for trial, delay in enumerate(delays):
                    worker = TimedWorker(WORKER_TOKEN)
                    params = message_params(f"job {trial}", sender=PHONES[20 + trial])
                    headers = {
                        "X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(
                            PUBLIC_URL + "/webhook", params
                        )
                    }
                    sent = time.monotonic()
                    await client.post(f"{relay_url}/webhook", data=params, headers=headers)
                    # The sleeping VM: every connection is counted and dropped, as refused.
                    async with _sleeping(worker_port) as asleep:
                        await anyio.sleep_until(anyio.current_time() + delay - (time.monotonic() - sent))
                    listening = Stamped()
                    async with run_server(worker.app(), reserve_port_at(worker_port), listening=listening):
                        if announce:
                            await listening.wait()
                            said = await worker.announce(relay_url, http=client)
                            assert said.status_code == 200, said.text
                        with anyio.move_on_after(30):
                            while worker.command_at is None:
                                await anyio.sleep(0.001)
                    if worker.command_at is None:
                        raise RuntimeError(f"wake {name}: trial {trial} got no command within 30 s")
                    assert listening.at is not None
                    waste.append(worker.command_at - listening.at)
                    rates.append((asleep.count + worker.health_polls) / (worker.command_at - sent))
    return waste, rates


class Stamped(Listening):
    """Notes the moment the worker's socket listens."""

    at: float | None = None

    def set(self) -> None:
        self.at = time.monotonic()
        super().set()


class _Counter:
    count = 0  # health polls


@asynccontextmanager
async def _sleeping(port: int) -> AsyncIterator[_Counter]:
    """A port that counts the health polls it gets and closes every connection: a VM not up yet."""
    counter = _Counter()

    async def drop(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with anyio.move_on_after(1):
                if (await stream.receive()).startswith(b"GET /health"):
                    counter.count += 1

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port, reuse_port=False)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, drop)
        yield counter
        tg.cancel_scope.cancel()


class TimedWorker(FakeWorker):
    """The fake worker, noting when /command arrives."""

    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.command_at: float | None = None

    async def _call(self, request):  # type: ignore[no-untyped-def]
        if request.url.path == "/command" and self.command_at is None:
            self.command_at = time.monotonic()
        return await super()._call(request)


async def first_reply(tmp: Path, trials: int = 30) -> None:
    """Webhook -> first outbound send at Twilio, with the worker awake and asleep."""
    validator = RequestValidator(AUTH_TOKEN)
    for state in ("awake", "asleep"):
        twilio, worker = FakeTwilio(ACCOUNT_SID, AUTH_TOKEN), FakeWorker(WORKER_TOKEN)
        async with run_server(twilio.app()) as twilio_url:
            worker_sock = reserve_port()
            relay_sock = reserve_port()
            relay_port = relay_sock.getsockname()[1]
            relay_sock.close()
            env = relay_process_env(tmp / state, twilio_url, url_of(worker_sock), relay_port, WAKE_TIMEOUT_MS="600000")
            (tmp / state).mkdir(exist_ok=True)
            times = []
            async with run_server(worker.app(), worker_sock) if state == "awake" else _nothing(worker_sock):
                with process(["-m", "relay"], env, tmp / state / "relay.log") as relay:
                    relay_url = f"http://127.0.0.1:{relay_port}"
                    await until_healthy(relay_url, relay)
                    async with httpx.AsyncClient() as client:
                        for trial in range(trials):
                            phone = PHONES[60 + trial]
                            params = message_params(f"job {trial}", sender=phone)
                            headers = {
                                "X-Twilio-Signature": validator.compute_signature(PUBLIC_URL + "/webhook", params)
                            }
                            before = len(twilio.bodies(phone))
                            sent = time.monotonic()
                            await client.post(f"{relay_url}/webhook", data=params, headers=headers)
                            with anyio.fail_after(30):
                                while len(twilio.bodies(phone)) == before:
                                    await anyio.sleep(0.0005)
                            arrived = next(m.at for m in twilio.messages if m.to == f"whatsapp:{phone}")
                            times.append(arrived - sent)
        p95 = pct(times, 95) * 1000
        emit(
            "first_reply",
            f"{state}_p95",
            p95,
            "ms",
            target="< 300 ms",
            met=p95 < 300,
            trials=trials,
            p50_ms=round(median(times) * 1000, 1),
        )


class _nothing:
    """An async context that leaves the worker's port bound but not listening: a sleeping VM."""

    def __init__(self, sock: object) -> None:
        self.sock = sock

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        self.sock.close()  # type: ignore[attr-defined]
