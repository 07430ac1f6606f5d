"""Worker benchmarks: boot time, screenshots, worker memory, the pair's overhead over the CLI."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from pathlib import Path

import anyio
import httpx

from bench.common import emit, listening_at, median, pct, process, rss_kb, tree_rss_kb, until_healthy
from fakes.anthropic import FakeAnthropic, Text
from fakes.flyproxy import FlyProxy
from fakes.github import FakeGitHub
from fakes.machines import FakeMachines
from fakes.origin import make_origin
from fakes.relay import FakeRelay
from fakes.servers import reserve_port, run_server, unix_socket
from fakes.twilio import FakeTwilio
from fakes.wiring import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    CHROMIUM,
    FILES,
    GITHUB_TOKEN,
    OWNER,
    PUBLIC_URL,
    WORKER_TOKEN,
    message_params,
    model_env,
    relay_env,
    signed_form,
    worker_env,
)

AUTH = {"Authorization": f"Bearer {WORKER_TOKEN}"}


def free_port() -> int:
    sock = reserve_port()
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def boot(tmp: Path, runs: int = 7) -> None:
    """Process start to first healthy /health: the worker against a bare uvicorn + Starlette app.
    And from the moment the worker's socket listens to its "up" reaching the relay."""
    origin = make_origin(tmp / "git-boot", FILES)
    relay = FakeRelay(WORKER_TOKEN)
    worker_times, bare_times, announce_delays = [], [], []
    for run in range(runs):
        port = free_port()
        async with run_server(relay.app()) as relay_url:
            env = worker_env(
                tmp / f"boot{run}",
                relay_url=relay_url,
                github_url="http://127.0.0.1:9",
                origin=origin,
                PORT=str(port),
                HOST="127.0.0.1",
                LOG_LEVEL="WARNING",
            )
            started = time.monotonic()
            with process(["-m", "vm"], env, tmp / "boot.log") as proc:
                worker_times.append(await until_healthy(f"http://127.0.0.1:{port}", proc) - started)
            # Apart from the boot figure: watching /proc every millisecond takes CPU from the boot.
            port = free_port()
            relay.presence.clear()
            with process(["-m", "vm"], {**env, "PORT": str(port)}, tmp / "boot.log") as proc:
                listened = await listening_at(port)
                with anyio.fail_after(10):
                    while not relay.presence:
                        await anyio.sleep(0.001)
                announce_delays.append(relay.presence[0][0] - listened)
        port = free_port()
        started = time.monotonic()
        # The reference on the worker's parser (h11): it boots what the worker boots.
        with process(["-m", "bench.bare", str(port), "h11"], {}, tmp / "bare-boot.log") as proc:
            bare_times.append(await until_healthy(f"http://127.0.0.1:{port}", proc) - started)
    worker_ms, bare_ms = median(worker_times) * 1000, median(bare_times) * 1000
    emit(
        "worker_boot",
        "median",
        worker_ms,
        "ms",
        reference=bare_ms,
        reference_name="bare uvicorn + Starlette",
        target="< 1.5x bare",
        met=worker_ms < 1.5 * bare_ms,
        runs=runs,
    )
    emit(
        "worker_boot",
        "announce_p95",
        pct(announce_delays, 95) * 1000,
        "ms",
        note="socket listening -> the worker's 'up' received by the relay",
        p50_ms=round(median(announce_delays) * 1000, 1),
        runs=runs,
    )


async def screenshots_and_memory(tmp: Path, warm_runs: int = 10) -> None:
    relay = FakeRelay(WORKER_TOKEN)
    origin = make_origin(tmp / "git-shot", FILES)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with run_server(relay.app()) as relay_url, httpx.AsyncClient(timeout=60) as client:
        env = worker_env(
            tmp / "shots",
            relay_url=relay_url,
            github_url="http://127.0.0.1:9",
            origin=origin,
            PORT=str(port),
            HOST="127.0.0.1",
            LOG_LEVEL="WARNING",
            CHROMIUM_PATH=CHROMIUM,
        )
        with process(["-m", "vm"], env, tmp / "shots.log") as proc:
            await until_healthy(url, proc)
            await anyio.sleep(1.0)  # let start-up settle before reading the idle footprint
            idle_kb, idle_tree_kb = rss_kb(proc.pid), tree_rss_kb(proc.pid)
            times = []
            for n in range(warm_runs + 1):
                await anyio.sleep(0.5)  # screenshots come seconds apart, not back to back
                before = len(relay.of_type("notice"))
                started = time.monotonic()
                body = {"phone": OWNER, "url": f"{url}/test-app", "message_id": f"shot-{n}"}
                assert (await client.post(f"{url}/screenshot", json=body, headers=AUTH)).status_code == 202
                with anyio.fail_after(60):
                    while len(relay.of_type("notice")) == before:
                        await anyio.sleep(0.002)
                times.append(time.monotonic() - started)
            after_kb, after_tree_kb = rss_kb(proc.pid), tree_rss_kb(proc.pid)
    warm = times[1:]
    emit("screenshot", "cold", times[0] * 1000, "ms", note="includes launching Chromium")
    emit(
        "screenshot",
        "warm_p50",
        pct(warm, 50) * 1000,
        "ms",
        target="< 300 ms",
        met=pct(warm, 50) < 0.3,
        runs=warm_runs,
        p95_ms=round(pct(warm, 95) * 1000, 1),
    )
    emit("memory", "worker_idle_rss", idle_kb / 1024, "MB", tree_mb=round(idle_tree_kb / 1024, 1))
    emit(
        "memory",
        "worker_rss_after_screenshot",
        after_kb / 1024,
        "MB",
        reference=idle_kb / 1024,
        reference_name="worker idle",
        tree_mb=round(after_tree_kb / 1024, 1),
        note="tree_mb counts Chromium's processes too",
    )


async def pair_overhead(tmp: Path, runs: int = 9) -> None:
    """Signed webhook -> final answer at the fake Twilio, against the same CLI run through the SDK
    (both kept open between prompts)."""
    model, twilio, github = FakeAnthropic(), FakeTwilio(ACCOUNT_SID, AUTH_TOKEN), FakeGitHub(GITHUB_TOKEN)
    for n in range(runs + 1):
        model.script(f"question {n}", Text(f"answer {n}"))
    origin = make_origin(tmp / "git-pair", FILES)
    pair_times: list[float] = []
    cli_times: list[float] = []
    async with (
        run_server(model.app()) as model_url,
        run_server(twilio.app()) as twilio_url,
        run_server(github.app()) as github_url,
        httpx.AsyncClient(timeout=60) as client,
    ):
        with ExitStack() as pair:
            relay_url, worker_url = await _pair(pair, tmp / "pair", model_url, twilio_url, github_url, origin)
            async with AsyncExitStack() as sdk:
                for n in range(runs + 1):  # the first run clones the checkout and starts the CLI: a warm-up
                    params = message_params(f"question {n}")
                    started = time.monotonic()
                    await client.post(
                        f"{relay_url}/webhook", data=params, headers=signed_form(PUBLIC_URL + "/webhook", params)
                    )
                    with anyio.fail_after(120):
                        while not any(f"answer {n}" in b for b in twilio.bodies(OWNER)):
                            await anyio.sleep(0.002)
                    elapsed = time.monotonic() - started
                    with anyio.fail_after(60):  # settled, as long before an owner's next message
                        while (await client.get(f"{worker_url}/health")).json()["busy"]:
                            await anyio.sleep(0.005)
                    if not n:
                        checkout = tmp / "pair" / "workspace" / OWNER.lstrip("+")
                        ask = await sdk.enter_async_context(_sdk_alone(model_url, checkout, tmp))
                        continue
                    pair_times.append(elapsed)
                    # Interleaved, so both sides see the same machine at the same moment.
                    cli_times.append(await ask(n))
    pair_ms, cli_ms = median(pair_times) * 1000, median(cli_times) * 1000
    emit(
        "end_to_end",
        "pair_overhead",
        pair_ms - cli_ms,
        "ms",
        target="< 150 ms",
        met=pair_ms - cli_ms < 150,
        pair_median_ms=round(pair_ms, 1),
        cli_median_ms=round(cli_ms, 1),
        runs=runs,
    )


@asynccontextmanager
async def _sdk_alone(model_url: str, cwd: Path, tmp: Path) -> AsyncIterator[Callable[[int], Awaitable[float]]]:
    """Claude Code through the SDK alone, kept open as the worker keeps it: each call is one
    prompt, from the query to its result."""
    from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient, PermissionResultAllow, ResultMessage

    async def allow(name: str, args: dict[str, object], context: object) -> PermissionResultAllow:
        return PermissionResultAllow()

    options = ClaudeAgentOptions(cwd=str(cwd), can_use_tool=allow, env=model_env(model_url, tmp / "pair"))
    async with ClaudeSDKClient(options) as client:

        async def ask(n: int) -> float:
            started = time.monotonic()
            await client.query(f"question {n}")
            async for message in client.receive_response():
                if isinstance(message, ResultMessage):
                    break
            return time.monotonic() - started

        await ask(0)  # its first prompt, like the pair's, is a warm-up
        yield ask


async def follow_up(tmp: Path, prompts: int = 9) -> None:
    """A follow-up prompt, from the signed webhook to the model's first request: on the CLI kept
    from the last prompt (WARM_AGENT=on), against a new CLI for every prompt (off). One relay +
    worker pair for each, one after the other (two workers on one machine would share the
    owner's agent user, and each would end the other's processes)."""
    model, twilio, github = FakeAnthropic(), FakeTwilio(ACCOUNT_SID, AUTH_TOKEN), FakeGitHub(GITHUB_TOKEN)
    origin = make_origin(tmp / "git", FILES)
    times: dict[str, list[float]] = {"on": [], "off": []}
    async with (
        run_server(model.app()) as model_url,
        run_server(twilio.app()) as twilio_url,
        run_server(github.app()) as github_url,
        httpx.AsyncClient(timeout=60) as client,
    ):
        for warm, figures in times.items():
            with ExitStack() as pair:
                relay_url, worker_url = await _pair(
                    pair, tmp / warm, model_url, twilio_url, github_url, origin, WARM_AGENT=warm
                )
                for n in range(prompts + 1):  # the first prompt clones and starts the first CLI: a warm-up
                    text = f"follow-up {n} ({warm})"
                    model.script(text, Text(f"reply {n} ({warm})"))
                    seen, params = len(model.arrived), message_params(text)
                    started = time.monotonic()
                    await client.post(
                        f"{relay_url}/webhook", data=params, headers=signed_form(PUBLIC_URL + "/webhook", params)
                    )
                    with anyio.fail_after(60):
                        while not any(f"reply {n} ({warm})" in b for b in twilio.bodies(OWNER)):
                            await anyio.sleep(0.005)
                        # Settled: the worker has taken the next run's snapshot, as it would
                        # long before an owner types their next message.
                        while (await client.get(f"{worker_url}/health")).json()["busy"]:
                            await anyio.sleep(0.005)
                    if n:
                        figures.append(model.arrived[seen] - started)
    warm_ms, new_ms = [t * 1000 for t in times["on"]], [t * 1000 for t in times["off"]]
    emit(
        "follow_up",
        "webhook_to_model_p50",
        median(warm_ms),
        "ms",
        reference=median(new_ms),
        reference_name="a new CLI per prompt (WARM_AGENT=off)",
        target="< 100 ms",
        met=median(warm_ms) < 100,
        p95_ms=round(pct(warm_ms, 95), 1),
        reference_p95_ms=round(pct(new_ms, 95), 1),
        prompts=prompts,
    )


async def _pair(
    stack: ExitStack, tmp: Path, model_url: str, twilio_url: str, github_url: str, origin: Path, **worker: str
) -> tuple[str, str]:
    """A relay and a worker process, both up and knowing each other; their URLs."""
    relay_port, worker_port = free_port(), free_port()
    relay_url, worker_url = f"http://127.0.0.1:{relay_port}", f"http://127.0.0.1:{worker_port}"
    await anyio.Path(tmp).mkdir(parents=True, exist_ok=True)
    renv = relay_env(tmp / "relay.sqlite3", twilio_url, worker_url, PORT=str(relay_port), HOST="127.0.0.1")
    wenv = {
        **model_env(model_url, tmp),
        **worker_env(tmp, relay_url=relay_url, github_url=github_url, origin=origin, PORT=str(worker_port)),
        "HOST": "127.0.0.1",
        "WORKSPACE_DIR": str(tmp / "workspace"),
        **worker,
    }
    relay = stack.enter_context(process(["-m", "relay"], {**renv, "LOG_LEVEL": "WARNING"}, tmp / "relay.log"))
    vm = stack.enter_context(process(["-m", "vm"], {**wenv, "LOG_LEVEL": "WARNING"}, tmp / "worker.log"))
    await until_healthy(relay_url, relay)
    await until_healthy(worker_url, vm)
    return relay_url, worker_url


async def suspend_vs_exit(tmp: Path, trials: int = 5) -> None:
    """The local console's wake, from suspend (SIGCONT) and from exit (a fresh `python -m vm`):
    the worker's ready time (woken -> its /health answers) and the owner's wait for the model
    (signed webhook -> the model's first request), through the console's Fly proxy."""
    figures: dict[str, tuple[list[float], list[float]]] = {}
    for action in ("exit", "suspend"):
        figures[action] = await _wakes(tmp / action, action, trials)
    for metric, index in (("ready", 0), ("first_model_request", 1)):
        suspended, exited = figures["suspend"][index], figures["exit"][index]
        emit(
            "wake_suspend",
            f"{metric}_p50",
            median(suspended) * 1000,
            "ms",
            reference=median(exited) * 1000,
            reference_name="from exit (a new process)",
            trials=trials,
            max_ms=round(max(suspended) * 1000, 1),
        )


async def _wakes(tmp: Path, action: str, trials: int) -> tuple[list[float], list[float]]:
    model, twilio, github = FakeAnthropic(), FakeTwilio(ACCOUNT_SID, AUTH_TOKEN), FakeGitHub(GITHUB_TOKEN)
    for n in range(trials + 1):
        model.script(f"question {n}", Text(f"answer {n}"))
    origin = make_origin(tmp / "git", FILES)
    relay_port, worker_port = free_port(), free_port()
    ready, first = [], []
    async with (
        run_server(model.app()) as model_url,
        run_server(twilio.app()) as twilio_url,
        run_server(github.app()) as github_url,
        httpx.AsyncClient(timeout=60) as client,
    ):
        wenv = {
            **model_env(model_url, tmp),
            **worker_env(
                tmp,
                relay_url=f"http://127.0.0.1:{relay_port}",
                github_url=github_url,
                origin=origin,
                PORT=str(worker_port),
                HOST="127.0.0.1",
                LOG_LEVEL="WARNING",
                IDLE_TIMEOUT_MS="1000",
                IDLE_ACTION=action,
                FLY_API_SOCKET=str(tmp / "fly-api.sock"),
                FLY_APP_NAME="textslash-vm",
                FLY_MACHINE_ID="bench",
            ),
        }
        with ExitStack() as workers:
            proxy = FlyProxy(
                lambda: workers.enter_context(process(["-m", "vm"], wenv, tmp / "worker.log")),
                f"http://127.0.0.1:{worker_port}",
                client,
            )
            machines = FakeMachines(on_suspend=proxy.suspend, state=proxy.state)
            async with (
                run_server(machines.app(), unix_socket(str(tmp / "fly-api.sock"))),
                run_server(proxy.app()) as proxy_url,
            ):
                renv = relay_env(tmp / "relay.sqlite3", twilio_url, proxy_url, PORT=str(relay_port), HOST="127.0.0.1")
                with process(["-m", "relay"], {**renv, "LOG_LEVEL": "WARNING"}, tmp / "relay.log") as relay:
                    await until_healthy(f"http://127.0.0.1:{relay_port}", relay)
                    for n in range(trials + 1):  # the first wake boots and clones: a warm-up
                        with anyio.fail_after(60):
                            while n and not (proxy.suspended if action == "suspend" else not proxy.running):
                                await anyio.sleep(0.005)
                        seen = len(model.requests)
                        params = message_params(f"question {n}")
                        started = time.monotonic()
                        await client.post(
                            f"http://127.0.0.1:{relay_port}/webhook",
                            data=params,
                            headers=signed_form(PUBLIC_URL + "/webhook", params),
                        )
                        up = await _health_after_wake(client, proxy, worker_port)
                        with anyio.fail_after(60):
                            while len(model.requests) == seen:
                                await anyio.sleep(0.001)
                        asked = time.monotonic()
                        with anyio.fail_after(60):
                            while not any(f"answer {n}" in b for b in twilio.bodies(OWNER)):
                                await anyio.sleep(0.005)
                        if n:
                            ready.append(up)
                            first.append(asked - started)
    return ready, first


async def _health_after_wake(client: httpx.AsyncClient, proxy: FlyProxy, port: int) -> float:
    """From the proxy's start or resume of the worker to its own /health answering."""
    with anyio.fail_after(60):
        while proxy.woke_at is None or proxy.suspended or not proxy.running:
            await anyio.sleep(0.001)
        woke = proxy.woke_at
        while True:
            try:
                if (await client.get(f"http://127.0.0.1:{port}/health", timeout=1)).status_code == 200:
                    return time.monotonic() - woke
            except httpx.TransportError:
                pass
            await anyio.sleep(0.002)
