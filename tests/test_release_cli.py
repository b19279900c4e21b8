"""The release CLI: init/add/list/refresh/rotate-key in-process; serve as a real subprocess
with deploy and pull against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import edge_sdk
from edge_sdk.cli import main
from edge_sdk.release import Repository
from edge_sdk.transport import MqttConfig, MqttConnection, RepoResponder
from edge_sdk.trust import UpdateClient
from tests._broker import Mosquitto
from tests._trust_env import make_artifact

EDGE_SDK = str(Path(sys.executable).with_name("edge-sdk"))


def _pull_with_old_root(tmp: Path, broker: Mosquitto, repo: Path, root: bytes, dest: Path,
                        name: str = "m") -> Path:
    cfg = MqttConfig(url=broker.url, fleet="lab")
    with MqttConnection(cfg, name="host") as host, MqttConnection(cfg, name="dev") as dev, \
            RepoResponder(host, repo):
        client = UpdateClient(trusted_root=root, metadata_dir=tmp / "dev" / "tuf",
                              partial_dir=tmp / "dev" / "part", connection=dev,
                              device_id="d1")
        return client.fetch_release(name, dest)


def test_release_commands_and_key_rotation_followed_by_old_clients(
        tmp_path: Path, broker: Mosquitto, capsys: pytest.CaptureFixture[str]) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    assert main(["release", "init", str(repo), "--keys", str(keys), "--threshold",
                 "targets=2", "--expires", "timestamp=2"]) == 0
    assert "device trust anchor" in capsys.readouterr().out
    for pem in keys.rglob("*.pem"):
        assert pem.stat().st_mode & 0o777 == 0o600
    assert not list(repo.rglob("*.pem"))
    old_root = (repo / "metadata" / "1.root.json").read_bytes()

    art = make_artifact(tmp_path / "arts", "m", "1.0")
    assert main(["release", "add", str(repo), str(art.path)]) == 0
    assert "released m 1.0" in capsys.readouterr().out
    assert main(["release", "list", str(repo), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(t["name"], t["version"]) for t in listing["targets"]] == [("m", "1.0")]
    assert listing["roles"]["timestamp"]["version"] == 2

    assert main(["release", "refresh", str(repo)]) == 0
    assert "timestamp v3" in capsys.readouterr().out
    for role in ("targets", "root", "timestamp"):
        assert main(["release", "rotate-key", str(repo), role]) == 0
    assert "root v4" in capsys.readouterr().out
    # Retired keys are kept aside, never used again for signing.
    assert len(list((keys / "retired").rglob("*.pem"))) == 4
    art2 = make_artifact(tmp_path / "arts", "m", "2.0", seed=1)
    assert main(["release", "add", str(repo), str(art2.path)]) == 0

    # A device provisioned with root v1 walks the rotations and accepts the new keys.
    path = _pull_with_old_root(tmp_path, broker, repo, old_root, tmp_path / "pulled")
    assert edge_sdk.Artifact.from_dir(path).manifest.version == "2.0"
    assert (tmp_path / "dev" / "tuf" / "root_history" / "4.root.json").exists()


def test_keys_inside_the_repository_are_refused(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    assert main(["release", "init", str(repo), "--keys", str(repo / "keys")]) == 2
    err = capsys.readouterr().err
    assert "inside the repository" in err and "Traceback" not in err
    assert not repo.exists() or not any(repo.iterdir())


def test_serve_subprocess_deploy_and_pull(tmp_path: Path, broker: Mosquitto,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    repo_obj = Repository.init(repo, keys)
    art = make_artifact(tmp_path / "arts", "m", "1.0")
    repo_obj.add_artifact(art.path)
    mqtt = ["--broker", broker.url, "--fleet", "lab"]
    serve = subprocess.Popen([EDGE_SDK, "serve", "--repo", str(repo), *mqtt],
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert serve.stderr is not None
        assert "serving" in serve.stderr.readline()
        assert main(["deploy", "--repo", str(repo), "--device", "d1", "--model", "m",
                     *mqtt]) == 0
        assert "edge/lab/dev/d1/desired" in capsys.readouterr().out
        out = tmp_path / "pulled"
        rc = subprocess.run(
            [EDGE_SDK, "pull", "m", "--root", str(repo / "metadata" / "root.json"),
             "--device", "d1", "-o", str(out), "--state", str(tmp_path / "state"), *mqtt],
            capture_output=True, text=True, timeout=120)
        assert rc.returncode == 0, rc.stderr
        assert "verified and wrote" in rc.stdout
        assert edge_sdk.Artifact.from_dir(out).manifest.sha256 == art.manifest.sha256

        # A root from another repository is not a trust anchor for this one.
        other = Repository.init(tmp_path / "other", tmp_path / "other-keys")
        code = main(["pull", "m", "--root", str(other.root_path), "--device", "d1", "-q",
                     "-o", str(tmp_path / "bad"), "--state", str(tmp_path / "s2"), *mqtt])
        err = capsys.readouterr().err
        assert code == 1 and "not signed by enough trusted keys" in err
        assert err.count("\n") == 1 and not (tmp_path / "bad").exists()
    finally:
        serve.terminate()
        serve.wait(10)
    assert serve.returncode == 0


def test_release_add_signs_deltas_and_pull_have_fetches_one(
        tmp_path: Path, broker: Mosquitto, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from tests._models import weighted_offset_model

    w = np.random.default_rng(0).standard_normal((4, 50_000)).astype(np.float32)
    repo, arts = tmp_path / "repo", tmp_path / "arts"
    assert main(["release", "init", str(repo), "--keys", str(tmp_path / "keys")]) == 0
    dirs = {}
    for v in ("1.0", "2.0", "3.0"):
        src = weighted_offset_model(tmp_path / f"m-{v}.onnx", float(v), w,
                                    np.full(100, float(v), np.float32))
        dirs[v] = edge_sdk.build_artifact(src, arts / v, name="m", version=v).path
    capsys.readouterr()
    assert main(["release", "add", str(repo), str(dirs["1.0"])]) == 0
    assert "delta" not in capsys.readouterr().out  # nothing earlier to start from
    assert main(["release", "add", str(repo), str(dirs["2.0"])]) == 0
    out = capsys.readouterr().out
    assert "released m 2.0" in out and "  delta from 1.0: " in out and "% of the full" in out
    assert main(["release", "add", str(repo), str(dirs["3.0"]), "--delta-bases", "0"]) == 0
    assert "delta" not in capsys.readouterr().out
    assert main(["release", "list", str(repo), "--json"]) == 0
    listing = {t["version"]: t for t in json.loads(capsys.readouterr().out)["targets"]}
    (delta,) = listing["2.0"]["deltas"]
    assert delta["from"] == "1.0" and 0 < delta["size_bytes"] < listing["2.0"]["size_bytes"] / 20
    assert listing["3.0"]["deltas"] == [] and listing["1.0"]["deltas"] == []
    assert main(["release", "list", str(repo)]) == 0
    assert f"  delta from 1.0: {delta['size_bytes']} bytes" in capsys.readouterr().out

    cfg = MqttConfig(url=broker.url, fleet="lab")
    with MqttConnection(cfg, name="host") as host, RepoResponder(host, repo):
        pull = ["pull", "m", "--version", "2.0", "--root", str(repo / "metadata" / "root.json"),
                "--device", "d1", "--state", str(tmp_path / "state"), "-q",
                "--broker", broker.url, "--fleet", "lab"]
        assert main([*pull, "-o", str(tmp_path / "got"), "--have", str(dirs["1.0"])]) == 0
        assert f"(delta from 1.0 ({delta['size_bytes']} bytes))" in capsys.readouterr().out
        got = edge_sdk.Artifact.from_dir(tmp_path / "got")
        assert got.manifest.sha256 == edge_sdk.Artifact.from_dir(dirs["2.0"]).manifest.sha256
        # Holding an unrelated version: the whole model comes.
        assert main([*pull, "-o", str(tmp_path / "got3"), "--have", str(dirs["3.0"])]) == 0
        assert "(full artifact (" in capsys.readouterr().out
        # A yanked base is still a base: a device holding 1.0 gets 2.0 by the delta.
        assert main(["release", "yank", str(repo), "m", "1.0", "--reason", "old"]) == 0
        capsys.readouterr()
        assert main([*pull, "-o", str(tmp_path / "got4"), "--have", str(dirs["1.0"])]) == 0
        assert f"(delta from 1.0 ({delta['size_bytes']} bytes))" in capsys.readouterr().out


_NO_FLEET = """
import sys
sys.modules["sqlalchemy"] = None  # as on a host without the [fleet] extra
from edge_sdk.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_release_and_serve_work_without_the_fleet_extra(tmp_path: Path,
                                                        broker: Mosquitto) -> None:
    repo = tmp_path / "repo"
    Repository.init(repo, tmp_path / "keys")
    art = make_artifact(tmp_path / "arts", "m", "1.0")
    run = [sys.executable, "-c", _NO_FLEET]
    add = subprocess.run([*run, "release", "add", str(repo), str(art.path)],
                         capture_output=True, text=True, timeout=120)
    assert add.returncode == 0, add.stderr
    assert "released m 1.0" in add.stdout
    assert "not recorded in the audit log" in add.stderr and "Traceback" not in add.stderr
    assert not (repo / "fleet.db").exists()
    # An explicit --db without the extra is a one-line error.
    bad = subprocess.run([*run, "release", "add", str(repo), str(art.path), "--db",
                          f"sqlite:///{tmp_path / 'f.db'}"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "pip install 'edge-sdk[fleet]'" in bad.stderr
    assert bad.stderr.count("\n") == 1
    serve = subprocess.Popen([*run, "serve", "--repo", str(repo), "--broker", broker.url,
                              "--fleet", "lab"], stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert serve.stderr is not None
        assert "responder only" in serve.stderr.readline()
        assert "serving" in serve.stderr.readline()
        # It answers: a device fetches the release through it.
        dest = tmp_path / "got"
        cfg = MqttConfig(url=broker.url, fleet="lab")
        with MqttConnection(cfg, name="dev") as dev:
            client = UpdateClient(trusted_root=(repo / "metadata" / "1.root.json").read_bytes(),
                                  metadata_dir=tmp_path / "dev" / "tuf",
                                  partial_dir=tmp_path / "dev" / "part", connection=dev,
                                  device_id="d1")
            client.fetch_release("m", dest)
        assert edge_sdk.Artifact.from_dir(dest).manifest.sha256 == art.manifest.sha256
    finally:
        serve.terminate()
        serve.wait(10)
    assert serve.returncode == 0


def test_every_fleet_and_db_option_shows_the_environment_variable_it_reads() -> None:
    # The README has operators export EDGE_FLEET and EDGE_DB once; --help must say which
    # options read them, on every command that has one.
    import click

    from edge_sdk.cli import cli

    ctx = click.Context(cli)
    unshown = []

    def walk(cmd: click.Command, path: str) -> None:
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None:
                    walk(sub, f"{path} {name}")
            return
        if (cmd.callback.__module__ or "").startswith("converters"):
            return  # convert --profile-on: the converter's own CLI, not the fleet's
        for p in cmd.params:
            if isinstance(p, click.Option) and p.envvar in ("EDGE_FLEET", "EDGE_DB") \
                    and not (p.show_envvar and p.help):
                unshown.append(f"{path} {p.opts[0]}")

    walk(cli, "edge-sdk")
    assert unshown == []
