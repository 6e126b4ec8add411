import pytest
import torch

from gbml import notebook


def test_resolve_device():
    assert notebook.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert notebook.resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="unknown device"):
        notebook.resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            notebook.resolve_device("cuda")


def test_smoke_mode_follows_the_environment(monkeypatch):
    monkeypatch.setenv("SMOKE_TEST", "1")
    assert notebook.smoke_test() and notebook.pick(1000, 10) == 10
    assert "smoke test" in notebook.describe_run(torch.device("cpu"))
    monkeypatch.setenv("SMOKE_TEST", "0")
    assert not notebook.smoke_test() and notebook.pick(1000, 10) == 1000
    monkeypatch.delenv("SMOKE_TEST")
    assert not notebook.smoke_test()


def test_run_description_parses_back(monkeypatch):
    for smoke, mode in (("1", "smoke test (reduced sizes)"), ("0", "full run")):
        monkeypatch.setenv("SMOKE_TEST", smoke)
        parts = notebook.parse_run_description(notebook.describe_run(torch.device("cpu")))
        assert parts is not None and parts["torch"] == torch.__version__ and parts["mode"] == mode
        assert parts["device"].startswith("CPU (") and parts["device"].endswith(" threads)")
    assert notebook.parse_run_description("Outputs produced somewhere else.") is None
