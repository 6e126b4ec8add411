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


# -- the meters ---------------------------------------------------------------------------------


def test_peak_memory_counts_what_is_alive_at_once():
    def two_in_turn():
        a = torch.ones(1000, dtype=torch.float64)  # 8000 bytes
        del a
        b = torch.ones(500, dtype=torch.float64)  # 4000 bytes, after a is freed
        return b

    def two_together():
        a = torch.ones(1000, dtype=torch.float64)
        b = torch.ones(500, dtype=torch.float64)
        return a, b

    assert notebook.peak_memory(two_in_turn)[0] == 8000
    assert notebook.peak_memory(two_together)[0] == 12000
    peak, result = notebook.peak_memory(lambda: torch.zeros(3))
    assert peak == 12 and torch.equal(result, torch.zeros(3))


def test_saved_tensor_meter_counts_tensors_kept_for_backward():
    x = torch.ones(100, dtype=torch.float64, requires_grad=True)
    y = torch.ones(100, dtype=torch.float64, requires_grad=True)
    with notebook.SavedTensorMeter() as meter:
        product = (x * y).sum()  # mul saves both factors: 2 × 800 bytes
    assert meter.peak == 1600
    product.backward()  # frees the graph and what it saved
    assert meter.current == 0
    with notebook.SavedTensorMeter() as meter:
        (x + y).sum()  # addition needs nothing for backward
    assert meter.peak == 0


def test_flop_count_of_a_matrix_product():
    a, b = torch.ones(4, 5), torch.ones(5, 6)
    assert notebook.flop_count(lambda: a @ b) == 2 * 4 * 5 * 6


def test_best_time_is_the_fastest_call(monkeypatch):
    clock = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])  # calls of 3, 1 and 2 seconds
    monkeypatch.setattr(notebook.time, "perf_counter", lambda: next(clock))
    calls = []
    assert notebook.best_time(lambda: calls.append(1), repeats=3) == 1.0
    assert len(calls) == 3
    with pytest.raises(ValueError, match="repeats"):
        notebook.best_time(lambda: None, repeats=0)
