"""auto's measured choice (rcl_kernels.autotune): the fastest of the timed candidates, the on-disk
cache (round trip, corrupt file, concurrent writers), no timing under torch.compile or CUDA-graph
capture, deterministic mode, and the switch."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import warnings

import pytest
import torch

import rcl_kernels as rk
from rcl_kernels import autotune, dispatch
from rcl_kernels.dispatch import Candidate, Problem


def problem(rows=600, columns=1600, dim=128, dtype=torch.float32):
    return Problem(torch.device("cpu"), dtype, rows, columns, dim, "mean", True)


def stand_ins(*names, timed_on=("cpu",)):
    kernels = dispatch.BACKENDS["cpu"].kernels["tiled"]
    return [Candidate("cpu", "tiled", n, kernels, timed_on=timed_on) for n in names]


class FakeClock:
    """A clock that only the stand-in calls advance (seconds)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    """A private cache dir, timing on, an empty memory cache; the injected timings per name."""
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path))
    autotune.set_enabled(True)
    autotune.clear_memory()
    times = {}
    calls = []
    clock = FakeClock()

    def fake_prepare(candidate, problem, allow_tf32):
        calls.append(candidate.name)
        return lambda: clock.advance(times[candidate.name])

    monkeypatch.setattr(autotune.tune, "__defaults__", (fake_prepare, clock))
    yield times, calls
    autotune.set_enabled(None)
    autotune.clear_memory()


def test_tune_picks_the_fastest_of_stand_in_candidates(tuning):
    times, calls = tuning
    eligible = stand_ins("a", "b", "c")
    times.update({"cpu:a": 0.030, "cpu:b": 0.010, "cpu:c": 0.020})
    chosen = autotune.choose(problem(), False, eligible, ["cpu:a", "cpu:b", "cpu:c"])
    assert chosen.name == "cpu:b"
    assert calls == ["cpu:a", "cpu:b", "cpu:c"]  # the static order first
    # The memory cache answers the next call of the same key without timing.
    times.update({"cpu:b": 1.0})
    assert autotune.choose(problem(rows=700), False, eligible, ["cpu:a"]).name == "cpu:b"
    assert len(calls) == 3
    # Another key (another N bucket) is timed afresh.
    assert autotune.choose(problem(rows=5000), False, eligible, ["cpu:a"]).name == "cpu:c"


def test_a_candidate_that_raises_is_not_chosen(tuning, monkeypatch):
    times, _ = tuning

    clock = FakeClock()

    def prepare(candidate, *args):
        if candidate.name == "cpu:a":
            raise RuntimeError("out of memory")
        return lambda: clock.advance(0.5)

    autotune._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="cpu:a failed to run"):
        name, ms = autotune.tune(problem(), False, stand_ins("a", "b"), prepare, clock)
    assert name == "cpu:b" and ms == {"cpu:b": 500.0}


def test_a_slow_spell_falls_on_every_candidate_alike():
    """The candidates are timed in rounds, and a fast shape gets more rounds within the budget: a
    slow spell of the machine during the first timed calls does not decide the choice (timed
    one candidate after the other, "cpu:a" would take the whole spell and lose)."""
    clock = FakeClock()
    own = {"cpu:a": 0.010, "cpu:b": 0.011}
    timed = []

    def prepare(candidate, *args):
        def call():
            timed.append(candidate.name)
            spell = 0.050 if 3 <= len(timed) <= 5 else 0.0  # after the two warm-up calls
            clock.advance(own[candidate.name] + spell)
        return call

    name, ms = autotune.tune(problem(), False, stand_ins("a", "b"), prepare, clock)
    assert name == "cpu:a" and ms == {"cpu:a": 10.0, "cpu:b": 11.0}
    assert timed[:4] == ["cpu:a", "cpu:b", "cpu:a", "cpu:b"]  # warm-ups, then rounds
    assert len(timed) > 2 + 2 * autotune.TIMED_ROUNDS


def test_a_far_slower_candidate_is_not_timed_again():
    clock = FakeClock()
    timed = []

    def prepare(candidate, *args):
        def call():
            timed.append(candidate.name)
            clock.advance({"cpu:a": 0.010, "cpu:b": 0.100}[candidate.name])
        return call

    name, ms = autotune.tune(problem(), False, stand_ins("a", "b"), prepare, clock)
    assert name == "cpu:a" and ms["cpu:b"] == 100.0
    assert timed.count("cpu:b") == 2  # its warm-up and the first round


def test_untimed_candidates_need_a_passing_self_test(tuning):
    """Without a verdict only the candidates timed on this device type are timed; a verdict
    decides either way."""
    times, calls = tuning
    timed, untimed = stand_ins("timed"), stand_ins("untimed", timed_on=())
    times.update({"cpu:timed": 0.02, "cpu:untimed": 0.01})
    device = autotune.device_model(torch.device("cpu"))
    assert [c.name for c in autotune.timing_eligible(timed + untimed, device, "cpu")] == ["cpu:timed"]
    autotune.update_cache("verdicts", device, {"cpu:untimed": {"verdict": "pass"},
                                               "cpu:timed": {"verdict": "fail"}})
    assert [c.name for c in autotune.timing_eligible(timed + untimed, device, "cpu")] == ["cpu:untimed"]


def test_cache_round_trip_across_processes(tuning, tmp_path):
    """The choice is written to disk and read back by a fresh process (memory cleared), which
    then does not time."""
    times, calls = tuning
    eligible = stand_ins("a", "b")
    times.update({"cpu:a": 0.02, "cpu:b": 0.01})
    assert autotune.choose(problem(), False, eligible, []).name == "cpu:b"
    files = list(tmp_path.glob("tuning-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    (entry,) = data["choices"][autotune.device_model(torch.device("cpu"))].values()
    assert entry["candidate"] == "cpu:b" and entry["ms"] == {"cpu:a": 20.0, "cpu:b": 10.0}
    assert data["versions"] == autotune.versions()
    autotune.clear_memory()
    calls.clear()
    times.update({"cpu:a": 0.001})  # would win if timed again
    assert autotune.choose(problem(), False, eligible, []).name == "cpu:b"
    assert calls == []


def test_corrupt_cache_is_ignored_with_a_warning_and_rewritten(tuning, tmp_path):
    times, _ = tuning
    path = autotune.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"format": 1, "choices": ')
    autotune._warn_once.cache_clear()
    times.update({"cpu:a": 0.02, "cpu:b": 0.01})
    with pytest.warns(RuntimeWarning, match="tuning cache .* is corrupt"):
        assert autotune.choose(problem(), False, stand_ins("a", "b"), []).name == "cpu:b"
    assert json.loads(path.read_text())["format"] == autotune.FORMAT


def _write_entries(args):
    cache_dir, worker = args
    import os

    os.environ[autotune.CACHE_ENV] = cache_dir
    for i in range(20):
        autotune.update_cache("choices", "model", {f"w{worker}-{i}": {"candidate": "cpu:tiled"}})


def test_concurrent_writers_keep_every_entry(tmp_path):
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        pool.map(_write_entries, [(str(tmp_path), w) for w in range(3)])
    import os

    os.environ[autotune.CACHE_ENV] = str(tmp_path)
    try:
        autotune.clear_memory()
        assert len(autotune.cached("choices", "model")) == 60
    finally:
        os.environ.pop(autotune.CACHE_ENV)
        autotune.clear_memory()


def test_no_timing_under_graph_capture_or_compile(tuning, monkeypatch):
    """Capture (mocked: no GPU needed) and compile tracing use the cache or the static order."""
    times, calls = tuning
    times.update({"cpu:a": 0.02, "cpu:b": 0.01})
    monkeypatch.setattr(autotune, "_no_timing_here", lambda device: "a CUDA graph is being captured")
    assert autotune.choose(problem(), False, stand_ins("a", "b"), ["cpu:a"]).name == "cpu:a"
    assert calls == []
    monkeypatch.undo()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert autotune.choose(problem(), False, stand_ins("a", "b"), ["cpu:a"]).name == "cpu:a"
    assert calls == []


def test_capture_check_reads_the_cuda_stream(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert "CUDA graph" in autotune._no_timing_here(torch.device("cuda"))
    assert autotune._no_timing_here(torch.device("cpu")) is None


def test_auto_under_torch_compile_makes_no_timing(tuning):
    """A compiled loss with backend='auto' traces (fullgraph) without timing anything."""
    import rcl_kernels as rk

    times, calls = tuning
    f = torch.nn.functional.normalize(torch.randn(16, 2, 8), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    y = torch.randint(0, 4, (16,))
    torch._dynamo.reset()
    compiled = torch.compile(lambda f: rk.bcl_loss(f, y, c), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(f), rk.bcl_loss(f, y, c, backend="reference"))
    assert calls == []


def test_deterministic_mode_is_part_of_the_key(tuning):
    times, _ = tuning
    times.update({"cpu:a": 0.02, "cpu:b": 0.01})
    previous = torch.are_deterministic_algorithms_enabled()
    key = autotune.problem_key(problem(), False)
    try:
        torch.use_deterministic_algorithms(True)
        assert autotune.problem_key(problem(), False) != key
    finally:
        torch.use_deterministic_algorithms(previous)


def test_switch_turns_timing_off(tuning, monkeypatch):
    times, calls = tuning
    times.update({"cpu:a": 0.02, "cpu:b": 0.01})
    autotune.set_enabled(None)
    monkeypatch.setenv(autotune.ENV, "0")
    assert not autotune.enabled()
    assert autotune.choose(problem(), False, stand_ins("a", "b"), ["cpu:a"]).name == "cpu:a"
    assert calls == []
    monkeypatch.setenv(autotune.ENV, "1")
    assert autotune.enabled()
    with pytest.raises(TypeError, match="flag"):
        autotune.set_enabled("yes")


def test_shipped_table_is_used_without_a_cache_entry(tuning, monkeypatch, tmp_path):
    times, calls = tuning
    device = autotune.device_model(torch.device("cpu"))
    tables = tmp_path / "tables"
    tables.mkdir()
    key = autotune.problem_key(problem(), False)
    (tables / f"{autotune.slug(device)}.json").write_text(json.dumps(
        {"format": 1, "choices": {device: {key: {"candidate": "cpu:b"}}}}))
    monkeypatch.setattr(autotune, "TABLES", tables)
    autotune.shipped_table.cache_clear()
    try:
        assert autotune.choose(problem(), False, stand_ins("a", "b"), ["cpu:a"]).name == "cpu:b"
        assert calls == []
    finally:
        autotune.shipped_table.cache_clear()


def test_tune_times_real_candidates():
    """The real timing runs the loss of each candidate and returns milliseconds."""
    candidates = [dispatch.find_candidate(n)[1] for n in ("cpu:tiled", "cpu:streaming")]
    candidate = candidates[0]
    name, ms = autotune.tune(problem(rows=64, columns=80, dim=16), False, candidates)
    assert name in ms and set(ms) == {"cpu:tiled", "cpu:streaming"}
    assert all(0 < t < 10_000 for t in ms.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataclasses.replace(candidate)


@pytest.mark.parametrize("reduction, requires_grad, expected", [
    ("mean", True, "|mean|grad=1"), ("none", True, "|none|grad=1"), ("sum", False, "|sum|grad=0")])
def test_the_loss_keys_its_choice_by_its_reduction_and_whether_it_needs_gradients(
        tuning, monkeypatch, reduction, requires_grad, expected):
    """A mean with gradients runs the one-pass tiled op, a per-anchor loss or a forward only do
    not: each is its own choice."""
    seen = []
    real_choose = autotune.choose

    def spy(problem, allow_tf32, eligible, order):
        seen.append(autotune.problem_key(problem, allow_tf32))
        return real_choose(problem, allow_tf32, eligible, order)

    monkeypatch.setattr(autotune, "choose", spy)
    times, _ = tuning
    times.update({"cpu:tiled": 0.01, "cpu:streaming": 0.02, "reference": 0.03})
    features = torch.nn.functional.normalize(torch.randn(8, 2, 4), dim=-1).requires_grad_(requires_grad)
    rk.supcon_loss(features, torch.arange(8) % 3, reduction=reduction)
    assert seen and expected in seen[0], seen
