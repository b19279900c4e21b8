"""An emulated arm64 device: the Debian rootfs of ``.ci/arm64-rootfs.sh`` (edge-sdk[agent]
installed from a wheel of this checkout in ``/opt/venv``), run through qemu-user-static and
binfmt_misc with ``chroot``.

The working copy lives outside the clone (``/var/tmp/edge-sdk-arm64-<pid>-*``) and is
removed by :meth:`Arm64Root.close`, which first unmounts everything mounted under it.
:func:`sweep_stale` does the same for what a killed run left behind. The chroot shares our
network namespace, so a broker on 127.0.0.1 is reachable from inside.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "arm64-rootfs.sh"
PREFIX = "edge-sdk-arm64-"
WORK = Path("/var/tmp")
#: e_machine of an AArch64 ELF file.
EM_AARCH64 = 183
#: The script's exit code for "this machine cannot run it".
UNAVAILABLE = 77
#: The environment inside: nothing of the host's (pip configuration, PYTHONPATH ...).
ENV = ("PATH=/opt/venv/bin:/usr/bin:/bin", "HOME=/root", "LANG=C.UTF-8",
       "PYTHONDONTWRITEBYTECODE=1")


class Unavailable(Exception):
    """This machine cannot run the arm64 rootfs (the message says why)."""


def _mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest last (in mount order)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = Path(line.split()[1].replace("\\040", " "))
        if point == path or path in point.parents:
            found.append(point)
    return found


def _unmount_all(path: Path) -> None:
    for point in reversed(_mounts_under(path)):
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _remove(path: Path) -> None:
    _unmount_all(path)
    if _mounts_under(path):
        raise RuntimeError(f"{path}: still mounted, not removed: {_mounts_under(path)}")
    # --one-file-system: never follow into a bind mount, even one that appeared meanwhile.
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def sweep_stale() -> None:
    """Unmount and delete working copies whose creating process is gone."""
    for path in WORK.glob(PREFIX + "*"):
        try:
            pid = int(path.name[len(PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            _remove(path)
        except (ValueError, PermissionError):
            continue


def build_wheel(out: Path) -> Path:
    """A wheel of this checkout (edge-sdk itself; its dependencies come from PyPI)."""
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                          "--disable-pip-version-check", "-w", str(out), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    wheels = sorted(out.glob("edge_sdk-*.whl"))
    if res.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"building the edge-sdk wheel failed: {res.stderr.strip()[-2000:]}")
    return wheels[0]


class Arm64Root:
    """A prepared arm64 rootfs with /proc (and an arm64 /proc/cpuinfo) and /dev mounted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.binds: list[Path] = []

    @classmethod
    def prepare(cls) -> Arm64Root:
        """Restore (or, the first time, build) the cached rootfs and install this checkout.

        Raises :class:`Unavailable` when this machine cannot run it."""
        if os.geteuid() != 0:
            raise Unavailable("the arm64 rootfs needs root (debootstrap, chroot, mount)")
        sweep_stale()
        path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=WORK))
        root = cls(path / "root")
        try:
            wheel = build_wheel(path / "wheel")
            res = subprocess.run(["bash", str(SCRIPT), str(root.path), str(wheel)],
                                 capture_output=True, text=True, timeout=1800)
            if res.returncode == UNAVAILABLE:
                raise Unavailable(res.stderr.strip().splitlines()[-1].removeprefix("arm64: "))
            if res.returncode != 0:
                raise RuntimeError(f"{SCRIPT.name} failed ({res.returncode}): "
                                   f"{res.stderr.strip()[-3000:]}")
            sys.stderr.write(res.stderr)
            root.check_arch()
            root.mount()
        except BaseException:
            _remove(path)
            raise
        return root

    def check_arch(self) -> None:
        """The rootfs's Python is an AArch64 binary: nothing here can silently run x86."""
        python = (self.path / "usr/bin/python3").resolve()
        # A path inside the rootfs: resolve() follows an absolute symlink on the host.
        if not python.is_relative_to(self.path):
            python = self.path / str(python).lstrip("/")
        header = python.read_bytes()[:20]
        machine = int.from_bytes(header[18:20], "little")
        if header[:4] != b"\x7fELF" or machine != EM_AARCH64:
            raise RuntimeError(f"{python} is not an AArch64 ELF file (e_machine {machine})")

    def _mount(self, *args: str) -> None:
        res = subprocess.run(["mount", *args], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"mount {' '.join(args)}: {res.stderr.strip()}")

    def mount(self) -> None:
        # No /sys: qemu-user 7.2 would show onnxruntime the host's CPU and it segfaults.
        self._mount("-t", "proc", "proc", str(self.path / "proc"))
        self._mount("--bind", str(self.path / "etc/edge-sdk/cpuinfo"),
                    str(self.path / "proc/cpuinfo"))
        self._mount("--bind", "/dev", str(self.path / "dev"))

    def bind(self, host_dir: Path) -> None:
        """Make ``host_dir`` visible inside at the same path."""
        inside = self.path / str(host_dir.resolve()).lstrip("/")
        inside.mkdir(parents=True, exist_ok=True)
        self._mount("--bind", str(host_dir.resolve()), str(inside))
        self.binds.append(inside)

    def cmd(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside, with a clean environment."""
        return ["chroot", str(self.path), "/usr/bin/env", "-i", *ENV, *argv]

    def run(self, argv: Sequence[str], *, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.cmd(argv), capture_output=True, text=True, timeout=timeout)

    def processes(self) -> list[int]:
        """Pids of the processes running inside (their root is the rootfs): what would keep
        its mounts busy."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if Path(os.readlink(proc / "root")) == self.path.resolve():
                    pids.append(int(proc.name))
            except OSError:  # gone meanwhile, or a kernel thread
                continue
        return pids

    def close(self) -> None:
        """Unmount everything under the working copy and delete it."""
        _remove(self.path.parent)

    def __repr__(self) -> str:
        return f"Arm64Root({str(self.path)!r})"
