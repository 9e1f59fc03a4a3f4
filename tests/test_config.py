import pytest

from vmem import Config
from vmem.config import parse_size


@pytest.mark.parametrize("text, expected", [
    ("8GiB", 8 * 2**30), ("8000MB", 8 * 10**9), ("512 KiB", 512 * 1024), ("1.5GiB", 3 * 2**29),
    ("0.5", 0.5), ("1.0", 1.0), ("123", 123), (4096, 4096), (0.25, 0.25), ("2tb", 2 * 10**12),
])
def test_parse_size_accepts(text, expected):
    assert parse_size(text, "budget") == expected


@pytest.mark.parametrize("text", ["8 GiBs", "-1", "0", "1.5", "abc", "", "GiB", True, "-2GiB"])
def test_parse_size_rejects_with_an_example(text):
    with pytest.raises(ValueError, match=r"budget=.*'8GiB'"):
        parse_size(text, "budget")


def test_explicit_beats_environment_beats_default():
    env = {"VMEM_DEVICE_BUDGET": "4GiB", "VMEM_POLICY": "vdnn_conv", "VMEM_LOG": "INFO"}
    cfg = Config.from_env(env=env, device_budget="2GiB")
    assert cfg.device_budget == 2 * 2**30  # explicit
    assert cfg.policy == "vdnn_conv"  # environment
    assert cfg.log == "info"
    assert cfg.backend == "auto" and cfg.prefetch_depth is None  # defaults


def test_every_variable_is_read():
    env = {"VMEM_DEVICE_BUDGET": "0.5", "VMEM_HOST_BUDGET": "32GiB", "VMEM_POLICY": "vdnn_all",
           "VMEM_PREFETCH_DEPTH": "3", "VMEM_BACKEND": "torch", "VMEM_REPORT": "r.json",
           "VMEM_LOG": "debug", "VMEM_REFINE_STEPS": "0"}
    cfg = Config.from_env(env=env)
    assert (cfg.device_budget, cfg.host_budget, cfg.policy, cfg.prefetch_depth, cfg.backend,
            cfg.report, cfg.log, cfg.refine_steps) == (0.5, 32 * 2**30, "vdnn_all", 3, "torch",
                                                       "r.json", "debug", 0)


@pytest.mark.parametrize("var, value", [
    ("VMEM_DEVICE_BUDGET", "8 gigs"), ("VMEM_HOST_BUDGET", "-3"), ("VMEM_POLICY", "fast"),
    ("VMEM_PREFETCH_DEPTH", "0"), ("VMEM_BACKEND", "opencl"), ("VMEM_LOG", "loud"),
    ("VMEM_REFINE_STEPS", "-1"), ("VMEM_REFINE_STEPS", "three"),
])
def test_malformed_variable_names_variable_value_and_example(var, value):
    with pytest.raises(ValueError) as info:
        Config.from_env(env={var: value})
    message = str(info.value)
    assert message.startswith(var) and repr(value) in message and "e.g." in message


def test_config_is_frozen_and_checked_on_construction():
    cfg = Config(device_budget="1GiB")
    assert cfg.device_budget == 2**30
    with pytest.raises(AttributeError):
        cfg.policy = "none"
    with pytest.raises(ValueError, match="policy"):
        Config(policy="everything")
    with pytest.raises(TypeError, match="unknown vmem option"):
        Config.from_env(env={}, budget="1GiB")


def test_resolve_budget():
    assert Config(device_budget=0.5).resolve_budget(16 * 2**30) == 8 * 2**30
    assert Config(device_budget="1GiB").resolve_budget(16 * 2**30) == 2**30
    assert Config().resolve_budget(16 * 2**30) is None
    with pytest.raises(ValueError, match="above the device's memory"):
        Config(device_budget="32GiB").resolve_budget(16 * 2**30)
