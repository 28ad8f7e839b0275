"""Owner-matching firewall rules: the TCP ports of TorchServe that can register a model answer root and the
server's user only.

TorchServe 0.12 always starts its gRPC management API (ModelServer.startGRPCServers starts both gRPC servers;
no setting turns one off) on a TCP address (Unix sockets are refused), and it registers a model directory from
any absolute path for whoever holds the management key: the guard (deploy/guard.py) never sees those calls.
Every local user can reach a loopback address, so the kernel must tell them apart: an nftables table per
server rejects connections to those ports from sockets of any other user (`meta skuid`), and from other
hosts. Only root can install it; deploy/server.py falls back to a loud warning without it.
"""

import os
import shutil
import subprocess


class FirewallError(RuntimeError):
    """The firewall rules cannot be installed: not root, no nft, or nft refused them."""


def table_name(port: int) -> str:
    """One table per server, named after its gRPC management port: test servers and the demo never collide."""
    return f"torchserve_{port}"


def rules(name: str, ports: list[int], uids: list[int]) -> str:
    """The nftables script: replace table `name` (created empty first, so that deleting it never fails)."""
    ports_set = ", ".join(map(str, sorted(set(ports))))
    uids_set = ", ".join(map(str, sorted(set(uids))))
    return f"""table inet {name} {{}}
delete table inet {name}
table inet {name} {{
    chain local_users {{
        type filter hook output priority 0; policy accept;
        tcp dport {{ {ports_set} }} meta skuid != {{ {uids_set} }} reject with tcp reset
    }}
    chain other_hosts {{
        type filter hook input priority 0; policy accept;
        iif != lo tcp dport {{ {ports_set} }} drop
    }}
}}
"""


def nft() -> str:
    """The path of the nft program; FirewallError when not root or nftables is not installed."""
    if os.geteuid() != 0:
        raise FirewallError("only root can install firewall rules (nftables)")
    path = shutil.which("nft")
    if not path:
        raise FirewallError("nft (nftables) is not installed: run scripts/setup.sh as root")
    return path


def restrict(name: str, ports: list[int], uids: list[int]):
    """Only processes of `uids` on this host can connect to `ports`. Raises FirewallError."""
    out = subprocess.run(
        [nft(), "-f", "-"], input=rules(name, ports, uids), capture_output=True, text=True, timeout=30
    )
    if out.returncode != 0:
        raise FirewallError(f"nft refused the rules: {out.stderr.strip()[-300:]}")


def lift(name: str) -> bool:
    """Remove table `name`; False when there was none (or no nft, or not root)."""
    try:
        path = nft()
    except FirewallError:
        return False
    return (
        subprocess.run([path, "delete", "table", "inet", name], capture_output=True, timeout=30).returncode
        == 0
    )


def active(name: str) -> bool:
    """Whether table `name` is installed (False also without nft or root)."""
    try:
        path = nft()
    except FirewallError:
        return False
    return (
        subprocess.run([path, "list", "table", "inet", name], capture_output=True, timeout=30).returncode == 0
    )
