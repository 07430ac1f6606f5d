"""Opening a pull request through GitHub's REST API (any base URL: tests use a loopback fake)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from vm.lazy_http import LazyHTTP

if TYPE_CHECKING:
    import httpx

API_VERSION = "2022-11-28"
# httpx's timeout bounds each read, not a response drip-fed a byte at a time: this bounds the
# whole call (two requests at most), so an approve always ends.
PR_TIMEOUT_S = 60.0


def api_headers(token: str) -> dict[str, str]:
    """What every request to GitHub's REST API carries: the token, and the API's version."""
    return {
        "Authorization": f"Bearer {token}",
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": API_VERSION,
    }


class GitHubError(RuntimeError):
    """The API refused or could not be reached; the message is safe to show the owner."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # GitHub's HTTP status, when it answered


class GitHub:
    def __init__(self, http: LazyHTTP, *, api_url: str, token: str, deadline_s: float = PR_TIMEOUT_S) -> None:
        self._http = http
        self._deadline_s = deadline_s
        self._api = api_url.rstrip("/")
        self._headers = api_headers(token)

    async def open_pull_request(self, *, repo: str, head: str, base: str, title: str, body: str) -> str:
        """Create the PR on `repo` (owner/name), or find the one already open for `head`;
        returns its web URL."""
        try:
            with anyio.fail_after(self._deadline_s):
                return await self._open(repo=repo, head=head, base=base, title=title, body=body)
        except TimeoutError:
            raise GitHubError(f"GitHub did not answer within {self._deadline_s:g} s") from None

    async def _open(self, *, repo: str, head: str, base: str, title: str, body: str) -> str:
        import httpx  # on first use, not at boot (see vm/lazy_http.py)

        url = f"{self._api}/repos/{repo}/pulls"
        payload = {"title": title, "head": head, "base": base, "body": body}
        client = await self._http.get()
        try:
            response = await client.post(url, json=payload, headers=self._headers, timeout=20.0)
            if response.status_code == 422 and "already exists" in response.text:
                owner = repo.split("/")[0]
                found = await client.get(
                    url, params={"head": f"{owner}:{head}", "state": "open"}, headers=self._headers, timeout=20.0
                )
                if found.status_code == 200 and found.json():
                    return str(found.json()[0]["html_url"])
        except httpx.HTTPError as exc:
            raise GitHubError(f"GitHub could not be reached ({type(exc).__name__})") from None
        if response.status_code != 201:
            raise GitHubError(
                f"GitHub answered HTTP {response.status_code}: {_message(response)}", response.status_code
            )
        return str(response.json()["html_url"])


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("message", ""))[:200]
    except ValueError:
        return response.text[:200]
