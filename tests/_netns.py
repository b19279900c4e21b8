"""A thin link for tests and benchmarks: a network namespace joined to ours by a veth pair,
shaped with ``tc qdisc ... tbf`` in both directions (netem is not on every kernel; tbf is).

Traffic stays on the pair: the namespace end gets ``DEVICE_IP`` and ours ``HOST_IP``,
link-local addresses in a /30 chosen per link, so nothing is routed anywhere else. A
process started with :meth:`ThinLink.wrap` runs inside the namespace (it reaches a
broker listening on :attr:`ThinLink.host_ip`). Names carry our pid and a random tag:
runs never collide, and :func:`sweep_stale` removes what a killed run left behind.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Sequence

PREFIX = "esdk-"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def unavailable() -> str | None:
    """Why no thin link can be made here (None when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command is missing (iproute2)"
    probe = f"{PREFIX}probe-{os.getpid():x}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def sweep_stale() -> None:
    """Delete namespaces of ours whose creating process is gone (a killed earlier run)."""
    listed = _ip("netns", "list", check=False).stdout.split()
    for name in listed:
        if not name.startswith(PREFIX):
            continue
        try:
            pid = int(name[len(PREFIX):].split("-")[0], 16)
            os.kill(pid, 0)
        except ProcessLookupError:
            _ip("netns", "del", name, check=False)
        except (ValueError, PermissionError):
            continue


class ThinLink:
    """Namespace ``name`` with ``dev_if`` inside, ``host_if`` here, both shaped to ``rate_bit``
    bits/s. ``latency_ms`` is tbf's queue bound (what a cellular modem buffers)."""

    def __init__(self, rate_bit: int, *, latency_ms: int = 500) -> None:
        tag = f"{os.getpid():x}-{random.getrandbits(24):06x}"
        self.name = f"{PREFIX}{tag}"
        short = tag[-6:]
        self.host_if, self.dev_if = f"esh{short}", f"esd{short}"
        net = random.randrange(1, 254)
        sub = random.randrange(0, 64) * 4
        self.host_ip = f"169.254.{net}.{sub + 1}"
        self.device_ip = f"169.254.{net}.{sub + 2}"
        self.rate_bit = rate_bit
        self.latency_ms = latency_ms
        self._made = False

    # -- life ------------------------------------------------------------------------------

    def __enter__(self) -> ThinLink:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        sweep_stale()
        self._made = True
        ns = ("-n", self.name)
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.dev_if)
        _ip("link", "set", self.dev_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip(*ns, "addr", "add", f"{self.device_ip}/30", "dev", self.dev_if)
        _ip("link", "set", self.host_if, "up")
        _ip(*ns, "link", "set", self.dev_if, "up")
        _ip(*ns, "link", "set", "lo", "up")
        self.shape(self.rate_bit, add=True)

    def close(self) -> None:
        """Remove the namespace (its veth end goes with it, and so does ours)."""
        if not self._made:
            return
        _ip("netns", "del", self.name, check=False)
        if _ip("link", "show", self.host_if, check=False).returncode == 0:
            _ip("link", "del", self.host_if, check=False)
        self._made = False

    # -- shaping and cutting ---------------------------------------------------------------

    def shape(self, rate_bit: int, *, add: bool = False) -> None:
        """Shape both directions to ``rate_bit`` bits/s."""
        self.rate_bit = rate_bit
        # tbf's bucket must hold at least one full frame and what one timer tick lets
        # through; a few milliseconds' worth keeps it a rate, not a burst allowance.
        # At 1 Gbit/s that is 500 kB (4 ms): one TCP stream across the pair then takes
        # 1.045x size / rate, its header overhead exactly (1514 bytes on the wire per
        # 1448 of payload), so the shaper carries the full rate (bench/thin_link.py).
        burst = max(4096, rate_bit // 8 // 250)
        verb = "add" if add else "change"
        spec = ["root", "tbf", "rate", f"{rate_bit}bit", "burst", str(burst),
                "latency", f"{self.latency_ms}ms"]
        subprocess.run(["tc", "qdisc", verb, "dev", self.host_if, *spec], check=True,
                       capture_output=True, timeout=30)
        subprocess.run(["tc", "-n", self.name, "qdisc", verb, "dev", self.dev_if, *spec],
                       check=True, capture_output=True, timeout=30)

    def set_up(self, up: bool) -> None:
        """Cut the link (``False``: ``ip link set ... down`` at both ends) or restore it."""
        state = "up" if up else "down"
        _ip("link", "set", self.host_if, state)
        _ip("-n", self.name, "link", "set", self.dev_if, state)

    def drops(self) -> int:
        """Packets tbf dropped (queue full) on both ends since the link was made."""
        total = 0
        for cmd in (["tc", "-s", "qdisc", "show", "dev", self.host_if],
                    ["tc", "-n", self.name, "-s", "qdisc", "show", "dev", self.dev_if]):
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
            words = out.replace(",", " ").split()
            if "dropped" in words:
                total += int(words[words.index("dropped") + 1])
        return total

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]
