"""Hostile network payloads, by family, for the parsers that face the broker.

Each family is a class of input an attacker can publish on any topic a component
listens to; :func:`payloads` draws many members of each from a seeded generator
(property-style: the test states what must hold for every member, the generator
supplies the members, and a failure names the family and index to replay).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

LIMIT = 128 * 1024


def _deep(rng: random.Random) -> bytes:
    depth = rng.choice([17, 100, 999, 1000, 1001, 5000, 20000, LIMIT - 10])
    opener = rng.choice([b"[", b'{"a":', b'{"signed":', b'[{"x":'])
    tail = rng.choice([b"", b"1", b"]" * 3, b"}" * 3])
    return (opener * depth)[:LIMIT] + tail


def _deep_closed(rng: random.Random) -> bytes:
    depth = rng.randint(17, 5000)
    return b"[" * depth + b"]" * depth


def _deep_inside_signed(rng: random.Random) -> bytes:
    depth = rng.randint(17, 3000)
    return (b'{"signed":{"counter":' + b"[" * depth + b"1" + b"]" * depth
            + b'},"signatures":[]}')


def _huge(rng: random.Random) -> bytes:
    size = rng.choice([LIMIT + 1, 2 * LIMIT, 4 * 1024 * 1024])
    kind = rng.randrange(3)
    if kind == 0:
        return json.dumps({"signed": {"counter": 9, "pad": "x" * size},
                           "signatures": []}).encode()
    if kind == 1:
        return b"[" + b"1," * (size // 2) + b"1]"
    return bytes(rng.getrandbits(8) for _ in range(64)) * (size // 64)


def _bad_utf8(rng: random.Random) -> bytes:
    bad = rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xfe\xff"])
    doc = json.dumps({"signed": {"counter": 7, "model": "m"}, "signatures": []}).encode()
    i = rng.randrange(len(doc))
    return doc[:i] + bad + doc[i:]


def _utf16(rng: random.Random) -> bytes:
    doc = json.dumps({"signed": {"counter": 7}, "signatures": []})
    return doc.encode(rng.choice(["utf-16", "utf-16-le", "utf-32", "utf-8-sig"]))


def _not_object(rng: random.Random) -> bytes:
    return rng.choice([b"1", b"-0", b'"signed"', b"null", b"true", b"[]", b"[1,2]",
                       b'[{"signed":{"counter":5}}]', b'""', b"1e5", b"  \n"])


def _constants(rng: random.Random) -> bytes:
    value = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"])
    return b'{"signed":{"counter":' + value + b'},"signatures":[],"v":1,"off":' + value + b"}"


def _wrong_counter(rng: random.Random) -> bytes:
    counter = rng.choice(['"7"', "7.0", "true", "false", "null", "[]", "{}", "-1",
                          "9" * 5000, "1" * 40, "7.5"])
    return ('{"signed":{"counter":' + counter + ',"fleet":"lab","devices":["d"]},'
            '"signatures":[{"keyid":"ab","sig":"zz"}]}').encode()


def _wrong_shapes(rng: random.Random) -> bytes:
    docs = [
        {"signed": [], "signatures": []},
        {"signed": {}, "signatures": {}},
        {"signed": {"counter": 3}, "signatures": [1, "x", None]},
        {"signed": {"counter": 3, "f": 1.5}, "signatures": [{"keyid": 1, "sig": []}]},
        {"signed": {"counter": 3}, "signatures": [{"keyid": "a" * 64, "sig": "not-hex"}]},
        {"v": 1, "id": "0" * 32, "dev": "d", "path": "metadata/x.json", "off": True,
         "len": 1},
        {"v": 1, "id": "0" * 32, "dev": ["d"], "path": "../../etc/passwd", "off": 0,
         "len": 10 ** 30},
        {"device": {"x": 1}, "online": "yes", "last_update": [], "model": {"name": 1},
         "groups": "g", "deployment": 1.5, "event": ["refused"]},
    ]
    return json.dumps(rng.choice(docs)).encode()


def _strings_with_brackets(rng: random.Random) -> bytes:
    # Brackets inside strings are text, not nesting: this member is valid and shallow.
    s = "".join(rng.choice('[{"\\]}x') for _ in range(rng.randint(1, 4000)))
    return json.dumps({"signed": {"counter": 3, "note": s}, "signatures": []}).encode()


def _random_bytes(rng: random.Random) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))


def _garbage(rng: random.Random) -> bytes:
    alphabet = b'[]{}":,\\ 0123456789.eE-+truefalsnNaIiy\x00\xff'
    return bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 2000)))


FAMILIES = {
    "deep nesting": _deep,
    "deep closed nesting": _deep_closed,
    "deep nesting inside a deployment": _deep_inside_signed,
    "huge payload": _huge,
    "invalid UTF-8": _bad_utf8,
    "UTF-16/32 and BOM": _utf16,
    "non-object JSON": _not_object,
    "NaN and Infinity": _constants,
    "wrong types for counter": _wrong_counter,
    "wrong shapes": _wrong_shapes,
    "brackets inside strings": _strings_with_brackets,
    "random bytes": _random_bytes,
    "JSON-alphabet garbage": _garbage,
}


def payloads(per_family: int = 25, seed: int = 11) -> Iterator[tuple[str, bytes]]:
    """``(family #index, payload)`` for ``per_family`` members of every family."""
    rng = random.Random(seed)
    for name, make in FAMILIES.items():
        for i in range(per_family):
            yield f"{name} #{i}", make(rng)


def state_report(version: str = "1", **extra: object) -> bytes:
    """An honest state report as an agent sends it, with ``extra`` keys replaced."""
    doc = {"online": True, "model": {"name": "adder", "version": version}, "phase": "idle",
           "deployment": 3, "groups": ["cams"], "tags": {"site": "berlin"},
           "last_update": {"deployment": 3, "result": "committed"}, **extra}
    return json.dumps(doc).encode()


#: Hand-written device reports the registry must refuse: name -> (payload, words of the
#: reason it gives). Used by test_fleet_registry (each one alone) and test_fleet_durable_e2e
#: (all of them in a flood).
HOSTILE_STATES = {
    "not UTF-8": (b"\xff\xfe\x00garbage", "not UTF-8"),
    "not JSON": (b"{not json", "not JSON"),
    "deep": (b"[" * 5000 + b"]" * 5000, "nested deeper"),
    "just over the depth": (b'{"a":' * 17 + b"1" + b"}" * 17, "nested deeper"),
    "huge": (b'{"model": {"name": "' + b"a" * 200_000 + b'", "version": "1"}}', "bytes, over"),
    "a list": (b"[1, 2, 3]", "must be a JSON object"),
    "a string": (b'"online"', "must be a JSON object"),
    "long model name": (state_report(model={"name": "m" * 300, "version": "1"}),
                        "model.name is 300 characters, over 256"),
    "version that is an object": (state_report(model={"name": "adder", "version": {"v": [1] * 80}}),
                                  "model.version is"),
    "counter out of range": (state_report(deployment=2**40), "deployment 1099511627776 is out"),
    "negative counter": (state_report(deployment=-1), "deployment -1 is out of range"),
    "huge result counter": (state_report(last_update={"deployment": 10**30, "result": "failed"}),
                            "last_update.deployment"),
    "long phase": (state_report(phase="p" * 65), "phase is 65 characters"),
    "NUL in a name": (state_report(model={"name": "ad\u0000der", "version": "1"}), "NUL"),
    "lone surrogate": (b'{"online": true, "last_update": {"result": "failed", '
                       b'"reason": "\\ud800"}}', "lone surrogate"),
}


HOSTILE_EVENTS = {
    "no event": (b'{"no": "event"}', "string 'event'"),
    "event not a string": (b'{"event": 5}', "string 'event'"),
    "counter out of range": (b'{"event": "committed", "deployment": {"counter": 1099511627776}}',
                             "deployment.counter"),
    "long model name": (json.dumps({"event": "failed", "model": {"name": "m" * 300,
                                                                  "version": "1"}}).encode(),
                        "model.name"),
    "lone surrogate": (b'{"event": "failed", "reason": "\\udfff"}', "lone surrogate"),
    "deep": (b'{"event": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper"),
}
