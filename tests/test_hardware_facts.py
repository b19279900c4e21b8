"""The hardware facts an agent reports in its state, and how ``edge-sdk status`` shows them."""

from __future__ import annotations

from device_agent._agent import Agent, cpu_facts
from device_agent._config import AgentConfig
from edge_sdk.cli._release import hardware_line

X86 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu vme sse4_1 sse4_2 avx avx2 fma avx512f avx512_vnni avx_vnni amx_int8 ht
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu vme sse4_1 sse4_2 avx avx2 fma avx512f avx512_vnni avx_vnni amx_int8 ht
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp i8mm bf16
CPU implementer\t: 0x41
"""


def test_x86_flags_are_cut_to_the_simd_and_int8_relevant_ones() -> None:
    model, feats = cpu_facts(X86)
    assert model == "Intel(R) Xeon(R) Platinum 8488C"
    assert feats == ["amx_int8", "avx", "avx2", "avx512_vnni", "avx512f", "avx_vnni", "fma",
                     "sse4_1", "sse4_2"]


def test_arm_features_are_read_from_the_features_line() -> None:
    model, feats = cpu_facts(ARM)
    assert model is None
    assert feats == ["asimd", "asimddp", "asimdhp", "bf16", "fphp", "i8mm"]


def test_status_cell_ranks_int8_features_first_and_ignores_hostile_values() -> None:
    hw = {"arch": "aarch64", "cores": 4, "cpu_features": ["asimd", "asimddp", "i8mm", "sve"]}
    assert hardware_line(hw) == "aarch64/4c/i8mm,sve,asimddp,asimd"
    many = {"arch": "x86_64", "cores": 8, "cpu_features": ["avx", "avx2", "avx512f",
                                                           "avx512_vnni", "fma", "sse4_1",
                                                           "sse4_2", "amx_int8"]}
    assert hardware_line(many) == "x86_64/8c/amx_int8,avx512_vnni,avx512f,avx2,avx,fma+"
    assert hardware_line({"arch": "a b\n", "cores": True, "cpu_features": [{"x": 1}]}) == "-"
    assert hardware_line("x86") == "-"


def test_agent_state_reports_features_providers_and_threads(tmp_path) -> None:
    cfg = AgentConfig(device_id="hw-1", fleet="lab", state_dir=tmp_path / "state", threads=3)
    hw = Agent(cfg, connect=False).snapshot()["hardware"]
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        _, expected = cpu_facts(f.read())
    assert hw["cpu_features"] == expected
    assert "CPUExecutionProvider" in hw["onnxruntime_providers"]
    assert hw["threads"] == 3 and 1 <= hw["usable_cores"] <= hw["cores"]
