"""The device side shared by the image examples: a signed release repository, a local
broker, ``edge-sdk serve``, one device agent, and a deployment of the artifact to it.

Every step is the CLI a user would type (echoed before it runs), as in ``demo.py``, whose
broker and process helpers this reuses.
"""

from __future__ import annotations

import json
import shutil
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from demo import Processes, free_port, run, start_broker, step, wait_port

FLEET = "images"
DEVICE = "cam-1"


@contextmanager
def deployed(work: Path, artifact: Path) -> Iterator[int]:
    """Release ``artifact``, deploy it to a freshly started agent and yield the agent's
    HTTP port once it serves it; everything started is stopped on exit."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    name, version = manifest["name"], manifest["version"]
    step("release it into a signed repository")
    repo, keys = work / "repo", work / "keys"
    for d in (repo, keys):
        shutil.rmtree(d, ignore_errors=True)
    run("release", "init", str(repo), "--keys", str(keys))
    run("release", "add", str(repo), str(artifact))
    with Processes() as procs:
        step("serve it on a local broker and start a device agent")
        broker, shared = start_broker(work, procs, "auto")
        mqtt = ["--broker", broker, "--fleet", FLEET]
        serve = ["serve", "--repo", str(repo), *mqtt, *([] if shared else ["--no-shared"])]
        print(f"$ edge-sdk {' '.join(serve)} &")
        procs.start("serve", [sys.executable, "-m", "edge_sdk", *serve], work / "serve.log")
        device = work / DEVICE
        shutil.rmtree(device, ignore_errors=True)
        device.mkdir()
        shutil.copyfile(repo / "metadata" / "1.root.json", device / "root.json")
        shutil.copyfile(repo / "deployment.pub.json", device / "deployment.pub.json")
        port = free_port()
        cfg = device / "agent.toml"
        cfg.write_text(
            f'device_id = "{DEVICE}"\nfleet = "{FLEET}"\nstate_dir = "state"\n'
            f'[broker]\nurl = "{broker}"\n'
            '[trust]\nroot = "root.json"\ndeployment_key = "deployment.pub.json"\n'
            f"[http]\nport = {port}\n"
            "[health]\nwindow_s = 1.0\nprobe_interval_s = 0.2\n")
        print(f"$ edge-sdk agent --config {cfg} &")
        log = work / f"{DEVICE}.log"
        agent = procs.start(DEVICE, [sys.executable, "-m", "edge_sdk", "agent", "--config",
                                     str(cfg)], log)
        wait_port(port, agent, "the agent", log)

        step(f"deploy {name} {version} to {DEVICE} and wait until it has committed it")
        run("deploy", "--repo", str(repo), "--device", DEVICE, "--model", name,
            "--version", version, "--wait", "--timeout", "120", *mqtt)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{name}/ready",
                                    timeout=10) as resp:
            print(f"GET /v2/models/{name}/ready -> {resp.status}")
        yield port


def post_image(port: int, name: str, path: Path) -> dict[str, object]:
    """What ``curl -H 'Content-Type: image/jpeg' --data-binary @FILE`` does: the file's
    bytes as the body of ``/v2/models/NAME/infer``; returns the JSON answer."""
    ctype = "image/png" if path.suffix == ".png" else "image/jpeg"
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{name}/infer",
                                 data=path.read_bytes(), method="POST",
                                 headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=10) as resp:
        answer: dict[str, object] = json.loads(resp.read())
    return answer
