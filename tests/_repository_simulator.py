"""An in-memory release repository behind the real :class:`RepositoryFetcher` interface.

Modelled on python-tuf's ``tests/repository_simulator.py``: the trust client
(:class:`~edge_sdk.trust.UpdateClient`) is given this object as its fetcher and
cannot tell it from the MQTT one, so attack tests run without a broker, in
milliseconds.

- The metadata is made by the real :class:`~edge_sdk.release.Repository` (real
  keys, real python-tuf signing); :meth:`RepositorySimulator.publish` copies what
  it serves (``metadata/`` and ``targets/``) into :attr:`files`, where a test may
  then replace, drop or corrupt any file in memory.
- :meth:`download` runs the real :class:`~edge_sdk.transport._window.ChunkWindow`
  against :meth:`answer` (the responder's part, one chunk at a time, through the
  wire encoding) on a virtual clock: a silent repository times out after its
  retries at once, and endless or short data meets the client's own checks.
- Misbehaviour is a subclass overriding :meth:`answer` (as the MQTT tests
  subclass the real responder); :attr:`fetched` and :attr:`requests` record what
  the client asked for.
"""

from __future__ import annotations

from collections.abc import Callable

from edge_sdk.release import Repository
from edge_sdk.transport import FetchConfig, FetchStats, RepositoryFetcher
from edge_sdk.transport import _chunks as proto
from edge_sdk.transport._window import ChunkWindow

#: Virtual time one request/answer round trip takes.
RTT_S = 0.001
#: A transfer still running after this much virtual time is a bug in the window.
MAX_VIRTUAL_S = 24 * 3600.0


class RepositorySimulator(RepositoryFetcher):
    """Serves :attr:`files` (repository path → bytes) to a trust client."""

    def __init__(self, repo: Repository | None = None,
                 config: FetchConfig | None = None) -> None:
        self.repo = repo
        self.config = config or FetchConfig()
        self.stats = FetchStats()
        self.files: dict[str, bytes] = {}
        #: The virtual clock, in seconds; only downloads move it.
        self.now = 0.0
        #: Every path a transfer was started for, in order.
        self.fetched: list[str] = []
        #: Every chunk request the client sent, as the responder decoded it.
        self.requests: list[proto.ChunkRequest] = []
        if repo is not None:
            self.publish()

    def publish(self) -> None:
        """Serve what the repository directory holds now (what ``edge-sdk serve`` serves)."""
        assert self.repo is not None
        root = self.repo.path
        self.files = {
            p.relative_to(root).as_posix(): p.read_bytes()
            for top in ("metadata", "targets") for p in sorted((root / top).rglob("*"))
            if p.is_file()
        }

    def target_path(self, name: str, version: str) -> str:
        """Where the model file of a release is served (its consistent-snapshot name)."""
        assert self.repo is not None
        rel = self.repo.find(name, version)
        dirname, _, base = rel.path.rpartition("/")
        return f"targets/{dirname}/{rel.sha256}.{base}"

    # -- the responder's part ------------------------------------------------------------

    def answer(self, req: proto.ChunkRequest) -> proto.ChunkResponse | None:
        """The answer to one chunk (None: say nothing). Misbehaving repositories override it."""
        data = self.files.get(req.path)
        if data is None:
            return proto.ChunkResponse(proto.NOT_FOUND, req.corr, req.offset, 0,
                                       f"{req.path} not found".encode())
        if req.offset > len(data):
            return proto.ChunkResponse(proto.BAD_REQUEST, req.corr, req.offset, len(data),
                                       b"offset past the end")
        return proto.ChunkResponse(proto.OK, req.corr, req.offset, len(data),
                                   data[req.offset:req.offset + req.length])

    def _respond(self, wire: bytes) -> list[proto.ChunkResponse]:
        req = proto.ChunkRequest.decode(wire)
        self.requests.append(req)
        out = []
        for i in range(req.count):
            one = req if req.count == 1 else proto.ChunkRequest(
                req.corr, req.path, req.offset + i * req.length, req.length)
            resp = self.answer(one)
            if resp is None:
                continue
            out.append(proto.ChunkResponse.decode(resp.encode()))
            if resp.status != proto.OK or one.offset + len(resp.payload) >= resp.total:
                break
        return out

    # -- the fetcher interface -----------------------------------------------------------

    def download(self, path: str, sink: Callable[[bytes], object], *, start: int = 0,
                 length: int | None = None, max_length: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> int:
        window = ChunkWindow(path, self.config, start=start, length=length,
                             max_length=max_length, stats=self.stats)
        self.fetched.append(path)
        while not window.done:
            assert self.now < MAX_VIRTUAL_S, f"{path}: the transfer never ends"
            arrived = [resp for req in window.requests(self.now)
                       for resp in self._respond(req.encode())]
            if not arrived:
                self.now += max(window.wait_s(self.now), RTT_S)
                continue
            self.now += RTT_S
            for resp in arrived:
                window.accept(resp, self.now)
            window.deliver(sink, progress)
        assert window.total is not None
        return window.total


class EvilRepository(RepositorySimulator):
    """Misbehaves on target files like ``tests._trust_env.EvilResponder``: ``mode`` is
    tamper, endless, silent, or cut (answers only below byte ``cut_at``); or
    endless-metadata (an endless timestamp.json)."""

    def __init__(self, repo: Repository, mode: str, *, cut_at: int = 0,
                 config: FetchConfig | None = None) -> None:
        super().__init__(repo, config)
        self.mode = mode
        self.cut_at = cut_at

    def answer(self, req: proto.ChunkRequest) -> proto.ChunkResponse | None:
        resp = super().answer(req)
        assert resp is not None
        if (self.mode in ("silent", "cut") and req.path.startswith("targets/")
                and resp.status == proto.OK and req.offset >= self.cut_at):
            return None
        return misbehave(self.mode, req, resp)


def misbehave(mode: str, req: proto.ChunkRequest,
              resp: proto.ChunkResponse) -> proto.ChunkResponse:
    """An honest answer to ``req`` turned into the ``mode`` attack (tamper, endless,
    endless-metadata); shared by this simulator and the MQTT ``EvilResponder``."""
    if mode == "endless-metadata" and req.path == "metadata/timestamp.json":
        return proto.ChunkResponse(resp.status, resp.corr, resp.offset, 1 << 30,
                                   resp.payload + b" " * (req.length - len(resp.payload)))
    if not req.path.startswith("targets/") or resp.status != proto.OK:
        return resp
    if mode == "tamper" and req.offset == 0:
        data = bytearray(resp.payload)
        data[len(data) // 2] ^= 0xFF
        return proto.ChunkResponse(resp.status, resp.corr, resp.offset, resp.total,
                                   bytes(data))
    if mode == "endless":
        return proto.ChunkResponse(resp.status, resp.corr, resp.offset, resp.total * 1000,
                                   resp.payload + b"\0" * 1024)
    return resp

