"""What deploy/ raises: its library functions return results or raise these, and only the command-line `main`s
turn them into messages and exit codes."""

import json


class ServerError(RuntimeError):
    """TorchServe, its guard or its front door could not be started, stopped or reached as asked."""


class DeployError(ServerError):
    """A management call or a deployment rule said no; the message says what to do."""


class NotReady(ServerError):
    """Something waited for did not become ready in time (deploy/process.py wait_until)."""


class UsageError(ValueError):
    """A value given by the user (an environment variable, a path, an option) cannot be used as it is."""


def error_body(status: int, kind: str, message: str) -> str:
    """A JSON error body shaped like TorchServe's own ({"code", "type", "message"}), for the answers the guard
    and the front door give themselves: json.dumps escapes whatever a message quotes."""
    return json.dumps({"code": status, "type": kind, "message": message})
