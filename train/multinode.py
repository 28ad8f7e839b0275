"""Two training nodes on one machine: the unchanged training command under torchrun on each node.

python -m train.multinode [--nnodes 2] [--timeout 900] -- TRAIN_ARGS...

Each node is a network namespace with its own address (10.231.7.1, 10.231.7.2); a veth pair joins them, like
a cable between two hosts. Node i runs

    torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d --rdzv-endpoint 10.231.7.1:29400
             --local-addr 10.231.7.<i+1> -m train.train TRAIN_ARGS...

with GLOO_SOCKET_IFNAME set to its end of the link, so the rendezvous and gloo's all-reduce both cross the
veth link. The namespaces (and with them the veth pair) are removed afterwards whatever happened. Needs root
and iproute2 (`ip netns`). On real hosts the torchrun line is the same with their addresses
(docs/multinode.md).
"""

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from bundle.settings import ROOT

SUBNET = "10.231.7"  # private to the namespaces: the same addresses in two concurrent runs never meet
RDZV_PORT = 29400  # torchrun's default c10d port, on node 0's address


class NodesError(RuntimeError):
    """The nodes cannot be made here: not root, no working `ip netns`, or a node count a veth pair cannot
    join."""


@dataclass
class Node:
    """One training node: its network namespace and its end of the veth pair."""

    index: int
    netns: str
    veth: str

    @property
    def address(self) -> str:
        """The node's address on the link: 10.231.7.<index + 1>."""
        return f"{SUBNET}.{self.index + 1}"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `ip ARGS` (iproute2); RuntimeError with its stderr when it fails and `check` is set."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def check_can_run():
    """NodesError unless this process can make network namespaces: root, and a working `ip netns`."""
    if os.geteuid() != 0:
        raise NodesError("network namespaces need root (ip netns add)")
    try:
        ip("netns", "list")
    except (OSError, RuntimeError) as e:
        raise NodesError(f"iproute2's `ip netns` does not work here ({e}); install iproute2") from None


def make_nodes(nnodes: int, tag: str) -> list[Node]:
    """Namespaces tsnode-<tag>-<i> joined by a veth pair (two nodes) and addresses 10.231.7.<i+1>/24.
    Interface names are at most 15 characters, hence the short tag."""
    if nnodes != 2:
        raise NodesError("--nnodes: a veth pair joins exactly two nodes")
    nodes = [Node(i, f"tsnode-{tag}-{i}", f"tsv{tag}{'ab'[i]}") for i in range(nnodes)]
    try:
        for node in nodes:
            ip("netns", "add", node.netns)
            ip("-n", node.netns, "link", "set", "lo", "up")
        ip("link", "add", nodes[0].veth, "type", "veth", "peer", "name", nodes[1].veth)
        for node in nodes:
            ip("link", "set", node.veth, "netns", node.netns)
            ip("-n", node.netns, "addr", "add", f"{node.address}/24", "dev", node.veth)
            ip("-n", node.netns, "link", "set", node.veth, "up")
    except BaseException:
        remove_nodes(nodes)
        raise
    return nodes


def kill_inside(node: Node):
    """SIGKILL every process in the node's namespace: torchrun and the trainers it started. Killing torchrun
    alone orphans its trainers, which keep the output pipe open (and wait up to gloo's 30-minute timeout for a
    peer)."""
    for _ in range(20):  # again until empty: torchrun may start a trainer between the listing and its death
        pids = ip("netns", "pids", node.netns, check=False).stdout.split()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        time.sleep(0.05)


def remove_nodes(nodes: list[Node]):
    """Kill what still runs inside the namespaces, then delete them (which deletes the veth ends in them)."""
    for node in nodes:
        kill_inside(node)
        ip("netns", "delete", node.netns, check=False)
    ip("link", "delete", nodes[0].veth, check=False)  # only if it never moved into a namespace


def leftovers(tag: str) -> list[str]:
    """Namespaces and links of run `tag` that still exist (tests check there are none)."""
    names = ip("netns", "list", check=False).stdout.split() + ip("-o", "link", check=False).stdout.split()
    return sorted(
        {n.split("@")[0].rstrip(":") for n in names if f"-{tag}-" in n or n.startswith(f"tsv{tag}")}
    )


def torchrun_command(node: Node, nnodes: int, rdzv_id: str, train_args: list[str]) -> list[str]:
    """The torchrun command for `node`: train.train with `train_args`, meeting the others at node 0's
    rendezvous."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nnodes),
        "--nproc_per_node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{SUBNET}.1:{RDZV_PORT}",
        "--rdzv-id",
        rdzv_id,
        # The namespaces share this machine's hostname, which resolves outside them, so torchrun cannot tell
        # by name which node hosts the rendezvous store or reach a node by name: say both.
        "--rdzv-conf",
        f"is_host={int(node.index == 0)}",
        "--local-addr",
        node.address,
        "-m",
        "train.train",
        *train_args,
    ]


def run(train_args: list[str], nnodes: int = 2, timeout: float = 900, tag: str | None = None) -> list[dict]:
    """Train on `nnodes` namespaced nodes; returns each node's {node, address, returncode, output}."""
    check_can_run()
    tag = tag or str(os.getpid() % 100000)
    nodes = make_nodes(nnodes, tag)
    procs = []
    try:
        for node in nodes:
            env = {
                **os.environ,
                "GLOO_SOCKET_IFNAME": node.veth,
                "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
            }
            cmd = [
                "ip",
                "netns",
                "exec",
                node.netns,
                *torchrun_command(node, nnodes, f"bundle-{tag}", train_args),
            ]
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            )
        deadline = time.time() + timeout
        outputs = []
        for node, proc in zip(nodes, procs):
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                kill_inside(node)
                proc.kill()
                out, _ = proc.communicate()
                out += f"\n[node {node.index}: killed after {timeout:.0f}s]".encode()
            outputs.append(
                {
                    "node": node.index,
                    "address": node.address,
                    "returncode": proc.returncode,
                    "output": out.decode(),
                }
            )
        return outputs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        remove_nodes(nodes)


def main(argv=None):
    """The command line: train on the nodes, print each node's output; exit 1 when a node failed or the
    nodes cannot be made here."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nnodes", default=2, type=int, help="nodes (network namespaces); a veth pair joins two")
    p.add_argument("--timeout", default=900, type=float, help="seconds before both nodes are killed")
    p.add_argument(
        "train_args", nargs=argparse.REMAINDER, help="after --: the arguments of python -m train.train"
    )
    args = p.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    t0 = time.time()
    try:
        results = run(train_args, args.nnodes, args.timeout)
    except NodesError as e:
        raise SystemExit(f"error: {e}") from None
    for r in results:
        print(f"--- node {r['node']} ({r['address']}): exit {r['returncode']}\n{r['output'].rstrip()}")
    failed = [r["node"] for r in results if r["returncode"] != 0]
    print(f"{len(results)} nodes, {time.time() - t0:.0f}s" + (f"; failed: nodes {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
