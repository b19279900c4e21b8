"""A device that floods its own chunk-request topic, as fast as its socket takes it.

MQTT 3.1.1 over a plain socket, with the device's own credentials (the example ACL lets
it publish only on ``edge/{fleet}/dev/{device}/repo/req``): one CONNECT, then the same
few hundred pre-encoded QoS 0 PUBLISH packets written in large batches, which is several
times what paho can publish from Python and about what a small C client on the device
manages. The requests are valid ones for ``--path`` (a mix of offsets, counts and
retransmit timeouts), so each costs the responder real work up to the device's budget.
The device also subscribes to its response topic and reads what arrives (a device that
stops reading is the broker's problem, not the responder's).

    python -m tests._mqttflood --host H --port P --user d1 --password PW --fleet lab \\
        --path targets/... --seconds 10

prints ``flooding`` once connected and, at the end, one JSON line with the counts.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import struct
import sys
import threading
import time

from edge_sdk.transport import MAX_CHUNK, Topics

_BATCH = 64  # packets per write


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect(host: str, port: int, user: str, password: str) -> socket.socket:
    """A logged-in MQTT 3.1.1 session (clean, keepalive 60 s) on a blocking socket."""
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = (_str(b"MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60)
            + _str(user.encode()) + _str(user.encode()) + _str(password.encode()))
    s.sendall(_packet(0x10, body))
    ack = s.recv(4)
    if len(ack) != 4 or ack[0] != 0x20 or ack[3] != 0:
        raise SystemExit(f"broker refused the flooder: {ack!r}")
    s.settimeout(None)
    return s


def requests(path: str, variants: int = 256, pad: int = 0) -> list[bytes]:
    """Valid chunk requests for ``path``: offsets over the first 32 chunks, 1 to 8 chunks
    each, some with a 1 ms retransmit timeout (so none is held back as a premature retry);
    ``pad`` bytes of an unknown field make each that much bigger."""
    out = []
    for i in range(variants):
        doc: dict[str, object] = {"v": 1, "id": secrets.token_hex(16), "path": path,
                                  "off": (i % 32) * MAX_CHUNK, "len": MAX_CHUNK,
                                  "n": 1 + i % 8}
        if i % 2:
            doc["rto"] = 1
        if pad:
            doc["pad"] = "x" * pad
        out.append(json.dumps(doc).encode())
    return out


def flood(sock: socket.socket, topic: str, payloads: list[bytes], seconds: float,
          qos: int = 0) -> int:
    """Publish ``payloads`` round robin for ``seconds``; return how many. At QoS 1 the
    acknowledgements are not waited for (message ids simply count up)."""
    t = _str(topic.encode())
    sent, mid = 0, 0
    end = time.monotonic() + seconds
    if qos == 0:
        packets = [_packet(0x30, t + p) for p in payloads]
        batches = [b"".join(packets[(j + k) % len(packets)] for k in range(_BATCH))
                   for j in range(0, len(packets), 8)]
        while time.monotonic() < end:
            sock.sendall(batches[sent // _BATCH % len(batches)])
            sent += _BATCH
        return sent
    while time.monotonic() < end:
        batch = []
        for _ in range(_BATCH):
            mid = mid % 65535 + 1
            batch.append(_packet(0x32, t + struct.pack("!H", mid)
                                 + payloads[sent % len(payloads)]))
            sent += 1
        sock.sendall(b"".join(batch))
    return sent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--fleet", default="lab")
    ap.add_argument("--path", required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--qos", type=int, choices=(0, 1), default=0)
    ap.add_argument("--pad", type=int, default=0, help="bytes added to each request")
    ap.add_argument("--no-read", action="store_true",
                    help="never read the socket (the broker's queue towards it fills)")
    args = ap.parse_args(argv)
    topics = Topics(args.fleet)
    sock = connect(args.host, args.port, args.user, args.password)
    sub = struct.pack("!H", 1) + _str(topics.repo_response(args.user).encode()) + b"\x01"
    sock.sendall(_packet(0x82, sub))
    received = [0]

    def drain() -> None:
        while True:
            try:
                data = sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            received[0] += len(data)

    if not args.no_read:
        threading.Thread(target=drain, daemon=True).start()
    print("flooding", flush=True)
    t0 = time.monotonic()
    sent = flood(sock, topics.repo_request(args.user), requests(args.path, pad=args.pad),
                 args.seconds, qos=args.qos)
    elapsed = time.monotonic() - t0
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    print(json.dumps({"requests": sent, "seconds": round(elapsed, 2),
                      "per_s": round(sent / elapsed), "received_bytes": received[0]}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
