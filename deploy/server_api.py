"""How a TorchServe object talks to its server's APIs (deploy/server.py's TorchServe inherits this): the keys
TorchServe wrote to key_file.json, read once and re-read when refused, the token API's refresh, and a listener
check so that no key goes to a port another local user holds."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Protocol

import requests

from bundle.settings import Ports
from deploy.canary_lease import TOKEN_HEADER
from deploy.errors import ServerError
from deploy.privileges import listener_uids

TOKEN_REFUSED = "Token Authorization failed"  # TorchServe's 400 for a missing, wrong or expired key


class Server(Protocol):
    """What KeyedApi's methods use of the class that inherits them (deploy/server.py's TorchServe)."""

    scheme: str
    host: str
    ports: Ports
    _tokens: bool | None
    _keys: dict | None
    lease_token: str | None

    @property
    def key_file(self) -> str:
        """The key_file.json TorchServe writes."""

    @property
    def uid(self) -> int:
        """The uid of the server's processes and files."""

    @property
    def tokens_enabled(self) -> bool:
        """Whether TorchServe checks keys."""

    def config(self) -> dict:
        """The properties a start gives TorchServe."""

    def running_config(self) -> dict | None:
        """The properties the running TorchServe was started with, or None."""

    def open(self, path: str) -> Any:
        """A file of the server's folder, opened for reading the way root may."""

    def url(self, api: str = "inference") -> str:
        """The base URL of one API."""

    def forget(self) -> None:
        """Drop what was read from the running server."""

    def keys(self) -> dict:
        """The keys of key_file.json, read once."""

    def read_keys(self) -> dict:
        """The keys of key_file.json, read now."""

    def auth(self, kind: str) -> dict:
        """The Authorization header for one kind of key."""

    def check_listener(self, api: str) -> None:
        """ServerError when a listener of another local user holds the API's port."""

    def refresh_token(self, kind: str) -> None:
        """Have TorchServe issue a new key of one kind."""


class KeyedApi:
    """The API half of TorchServe: URLs, keys and authenticated requests."""

    _tokens: bool | None  # TorchServe's fields: what was read from the running server, until forget()
    _keys: dict | None

    def url(self: Server, api: str = "inference") -> str:
        """The base URL of `api` (a field of Ports). Only inference may live elsewhere (TS_INFERENCE_URL); the
        management port, which refreshes keys with the never-expiring API key, is always this machine's."""
        if api == "inference":
            return f"{self.scheme}://{self.host}:{self.ports.inference}"
        return f"http://127.0.0.1:{getattr(self.ports, api)}"

    @property
    def tokens_enabled(self: Server) -> bool:
        """Whether TorchServe checks keys: as the running server was started (`serve.sh start --no-tokens`
        turns them off for that run only), else as the config says; read once, until forget()."""
        if self._tokens is None:
            props = self.running_config()
            if props is None:
                props = self.config()
            # Boolean.parseBoolean
            tokens = props.get("disable_token_authorization", "false").lower() != "true"
            self._tokens = tokens
            return tokens
        return self._tokens

    def forget(self: Server):
        """Drop what was read from the running server (token mode, keys): after a start, stop or refused
        key."""
        self._tokens = self._keys = None

    def check_listener(self: Server, api: str):
        """Refuse to send a management or API key to a port that a listener of another local user holds: one
        who took the management port while its guard was down would be handed the key."""
        port = getattr(self.ports, api)
        strangers = listener_uids(port) - {0, os.geteuid(), self.uid}
        if strangers:
            raise ServerError(
                f"port {port} ({api}) is held by a process of uid {min(strangers)}, not this server's: "
                "no key was sent to it. Stop that process, then scripts/serve.sh start"
            )

    def keys(self: Server) -> dict:
        """The keys of key_file.json ({kind: {"key": ...}}), read once, until forget()."""
        if self._keys is None:
            self._keys = self.read_keys()
        return self._keys

    def read_keys(self: Server) -> dict:
        """The keys of key_file.json, read now (a torn read is retried for about 5 s); ServerError when it
        cannot be read."""
        for _ in range(50):  # TorchServe may be writing the file right now: retry a torn read
            try:
                with self.open(self.key_file) as f:
                    return json.loads(f.read(1 << 20))
            except (json.JSONDecodeError, OSError):
                time.sleep(0.1)
        raise ServerError(f"cannot read {self.key_file}: is TorchServe running with tokens on?")

    def auth(self: Server, kind: str) -> dict:
        """Authorization header for 'inference' or 'management' (empty when tokens are off)."""
        if not self.tokens_enabled:
            return {}
        return {"Authorization": f"Bearer {self.keys()[kind]['key']}"}

    def request(self: Server, method: str, api: str, path: str, **kw) -> requests.Response:
        """An API call with the current key. When TorchServe refuses the key (400: missing, wrong or expired),
        re-read the key file (the server may have restarted) or, if it is unchanged, refresh the key through
        the token API, and retry once."""
        kind = "inference" if api == "inference" else "management"
        headers, timeout = kw.pop("headers", {}), kw.pop("timeout", 120)

        if kind == "management":
            self.check_listener(api)
            if self.lease_token:  # a canary's own calls (deploy/canary_lease.py); the guard drops it
                headers = {**headers, TOKEN_HEADER: self.lease_token}

        def send():
            return requests.request(
                method, self.url(api) + path, headers={**self.auth(kind), **headers}, timeout=timeout, **kw
            )

        resp = send()
        if resp.status_code == 400 and TOKEN_REFUSED in resp.text and self.tokens_enabled:
            sent = self.keys()
            self.forget()
            if self.tokens_enabled and self.keys() == sent:
                self.refresh_token(kind)
            resp = send()  # with the caller's headers (Content-Type...) and timeout
        return resp

    def refresh_token(self: Server, kind: str):
        """Have TorchServe issue a new `kind` key through the token API (asked with the API key, on this
        machine's management port); the new key is read at its next use. ServerError when refused."""
        self.check_listener("management")
        api_key = self.keys()["API"]["key"]
        resp = requests.get(
            self.url("management") + f"/token?type={kind}",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=30,
        )
        if resp.status_code != 200:
            raise ServerError(
                f"could not refresh the {kind} token ({resp.status_code} {resp.text.strip()}); "
                "restart with scripts/serve.sh stop && scripts/serve.sh start"
            )
        self._keys = None  # TorchServe wrote the new key to key_file.json
