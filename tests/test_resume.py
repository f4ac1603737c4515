"""Time-boxed, resumable runs: the budget's decisions, signals, atomic files, output
checks, and stop/continue of C&W, C&W-wb and training giving the uninterrupted result."""
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rce_fast import attacks as A
from rce_fast.attacks import cw as cw_module
from rce_fast.data import load_digits_split
from rce_fast.detect import KDensityDetector
from rce_fast.resume import (Budget, BudgetTooSmall, ResumeMismatch, StopRequested,
                             WorkControl, atomic_torch_save, atomic_write_text, check_output_file,
                             check_output_folder, handle_signals, pack_like, process_age,
                             settings_diff, unpack_like)
from rce_fast.train import TrainConfig, load_classifier, train

from .helpers import digits_mlp, digits_tensors


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def nth(kind, n):
    """stop_if: refuse the n-th grant of ``kind`` (1-based) in this session."""
    return lambda k, grants: k == kind and sum(g[0] == kind for g in grants) >= n - 1


# ----------------------------------------------------------------------------- budget

def test_budget_without_limit_grants_everything_and_relays_stops():
    b = Budget()
    assert b.grant("x", 500) == 500 and b.left() == math.inf
    b.done()
    assert Budget(max_chunk=7).grant("x", 500) == 7
    b = Budget(stop_after=2, max_chunk=10)
    assert [b.grant("x", 100) for _ in range(3)] == [10, 10, 0]
    assert "stop_after=2" in b.stop_reason
    b = Budget(stop_if=nth("y", 2))
    assert b.grant("x", 5) == 5 and b.grant("y", 5) == 5 and b.grant("x", 1) == 1
    assert b.grant("y", 5) == 0 and b.grants == [("x", 5), ("y", 5), ("x", 1)]


def test_budget_probes_then_sizes_chunks_from_the_measured_rate():
    clock = FakeClock()
    b = Budget(100.0, clock=clock, reserve=10.0, safety=1.25, chunk_seconds=20.0)
    assert b.grant("step", 1000) == 1          # unknown rate: a one-step probe
    clock.now += 0.5
    b.done()
    assert b.rate("step") == 0.5
    assert b.grant("step", 1000) == 40         # 20 s chunks at 0.5 s per step
    clock.now += 40 * 0.5
    b.done()
    # 79.5 s left - 10 s reserve = 69.5 s; 69.5 / (0.5 * 1.25) = 111 steps fit, chunk 40
    assert b.grant("step", 1000) == 40
    clock.now += 40 * 0.5
    b.done(steps=40)
    clock.now = 1000.0 + 85.0                   # 15 s left, 5 s spare: 8 steps fit,
    assert b.grant("step", 1000) == 4           # half of them planned
    b.done(0)
    clock.now = 1000.0 + 89.2                   # 0.8 s spare: 1 step fits
    assert b.grant("step", 1000) == 1
    b.done(0)
    clock.now = 1000.0 + 89.5                   # 0.5 s spare: not one step (0.625 s)
    assert b.grant("step", 1000) == 0 and b.stop_reason == "time budget"
    assert b.rate("other") is None


def test_a_budget_too_small_for_any_progress_is_an_error_not_a_stop():
    """Stopping before the first piece of work would make every re-run stop there too."""
    clock = FakeClock()
    b = Budget(10.0, clock=clock, reserve=3.0)
    clock.now += 8.0                            # start-up took 8 of the 10 s
    with pytest.raises(BudgetTooSmall, match="too small.*train.*larger --time-budget"):
        b.grant("train", 100)
    b = Budget(60.0, clock=clock, reserve=3.0)
    with pytest.raises(BudgetTooSmall, match="JSMA"):
        b.allow("JSMA", estimate=100.0)
    assert b.allow("FGSM", estimate=10.0)       # once work was done, a refusal is a stop
    b.done()
    assert not b.allow("JSMA", estimate=100.0) and b.stop_reason == "time budget"


def test_budget_refuses_indivisible_units_that_would_not_fit():
    clock = FakeClock()
    b = Budget(60.0, clock=clock, reserve=5.0, safety=1.25)
    assert b.allow("attack", estimate=40.0)     # 50 s needed, 55 s spare
    clock.now += 45.0                           # slower than estimated
    b.done()
    assert b.rate("attack") == 45.0
    assert not b.allow("attack", estimate=1.0)  # the measured 45 s counts, 10 s left
    assert b.stop_reason == "time budget"
    b = Budget(60.0, clock=clock, reserve=5.0)
    assert b.grant("step", 1) == 1
    b.done()
    b.note_save(3.0)                            # the reserve grows by twice the slowest save
    clock.now += 50.0
    assert not b.allow("tiny", estimate=0.1)


@pytest.mark.parametrize("step_seconds", [0.003, 0.2, 1.7, 9.0])
@pytest.mark.parametrize("jitter", [0.0, 0.2])
def test_a_chunked_loop_never_overruns_its_budget(step_seconds, jitter):
    """Simulated work whose steps take step_seconds (+- jitter, within the safety
    factor): the run stops with at least the reserve left, having used most of it."""
    clock = FakeClock()
    rng = random.Random(0)
    b = Budget(120.0, clock=clock, reserve=4.0, safety=1.25, chunk_seconds=15.0)
    done = 0
    while True:
        n = b.grant("step", 10**9)
        if n == 0:
            break
        for _ in range(n):
            clock.now += step_seconds * (1 + jitter * rng.uniform(-1, 1))
        done += n
        b.done()
    assert b.elapsed() <= 120.0 - 4.0
    assert b.elapsed() >= 120.0 - 4.0 - 1.25 * step_seconds * (1 + jitter) * 2 - 1e-9
    assert done > 0


def test_a_machine_that_slows_down_late_overruns_by_little():
    """Steps suddenly three times slower (a busy neighbour) in the last minute: the
    halving chunks notice it, and the stop comes at most a few steps late."""
    clock = FakeClock()
    b = Budget(300.0, clock=clock, reserve=6.0, chunk_seconds=60.0)
    while (n := b.grant("step", 10**9)):
        for _ in range(n):
            clock.now += 0.1 if b.elapsed() < 240 else 0.3
        b.done()
    assert b.elapsed() <= 300.0 - 6.0 + 3 * 0.3


def test_a_chunk_that_runs_far_slower_than_planned_stops_when_the_reserve_is_reached():
    """Steps ten times slower from the middle of a chunk on (the planned chunk no longer
    fits): a loop reading ``interrupted`` before each step stops one step after the
    reserve line at most, and the budget says why."""
    clock = FakeClock()
    b = Budget(120.0, clock=clock, reserve=5.0, chunk_seconds=60.0)
    stopped = False
    while not stopped and (n := b.grant("step", 10**9)):
        ran = 0
        for _ in range(n):
            if b.interrupted:
                stopped = True
                break
            clock.now += 0.1 if b.elapsed() < 60 else 1.0
            ran += 1
        b.done(ran)
    assert stopped and b.stop_reason == "time budget"
    assert 120.0 - 5.0 <= b.elapsed() <= 120.0 - 5.0 + 1.0
    # With steps as planned the per-step check never fires before the grant refuses.
    clock = FakeClock()
    b = Budget(120.0, clock=clock, reserve=5.0, chunk_seconds=60.0)
    while (n := b.grant("step", 10**9)):
        for _ in range(n):
            assert not b.interrupted
            clock.now += 0.1
        b.done()
    assert b.stop_reason == "time budget" and b.elapsed() <= 115.0


def test_signals_stop_at_the_next_safe_point_or_abandon_an_indivisible_unit():
    b = Budget(max_chunk=3)
    assert not b.interrupted
    b.request_stop("SIGTERM")
    assert b.interrupted and b.grant("x", 5) == 0 and b.stop_reason == "SIGTERM received"
    with pytest.raises(StopRequested, match="SIGINT"):
        b.request_stop("SIGINT")                # a second signal stops at once
    b = Budget()
    with pytest.raises(StopRequested, match="SIGTERM"):
        with b.abandonable():
            b.request_stop("SIGTERM")
    b = Budget()
    with handle_signals(b):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert b.interrupted and b.signal == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_the_budget_counts_the_start_up_of_the_process():
    age = process_age()
    assert 0.0 < age < 86400.0  # this process started before the test
    clock = FakeClock()
    b = Budget(60.0, clock=clock, spent=4.5)
    assert b.elapsed() == 4.5 and b.left() == 55.5


def test_budget_argument_checks():
    for kw, match in [({"seconds": 0}, "seconds"), ({"seconds": float("nan")}, "seconds"),
                      ({"safety": 0.5}, "safety"), ({"max_chunk": 0}, "max_chunk"),
                      ({"stop_after": -1}, "stop_after"), ({"chunk_seconds": 0}, "chunk")]:
        with pytest.raises(ValueError, match=match):
            Budget(**kw)


# ------------------------------------------------------------------------------ files

def test_atomic_writes_leave_the_old_file_and_no_temporary_on_failure(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"a": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"a": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    atomic_write_text(tmp_path / "r.md", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.md", "state.pt"]


def test_output_checks_name_the_path(tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"a_file is a file, not a folder"):
        check_output_file(afile / "sub" / "m.pt")
    with pytest.raises(ValueError, match="is a folder, expected a file"):
        check_output_file(tmp_path)
    with pytest.raises(ValueError, match="exists and is not a folder"):
        check_output_folder(afile)
    with pytest.raises(ValueError, match="a_file is a file"):
        check_output_folder(afile / "run")
    assert check_output_file(tmp_path / "new" / "m.pt") == tmp_path / "new" / "m.pt"
    assert (tmp_path / "new").is_dir() and list((tmp_path / "new").iterdir()) == []


def test_output_checks_refuse_an_unwritable_folder(tmp_path):
    if os.geteuid() == 0:  # root writes through permissions: use a folder nobody can
        target = Path("/proc/rce_fast_out/m.pt")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "m.pt"
    with pytest.raises(ValueError, match=str(target.parent)):
        check_output_file(target)


def test_settings_diff_lists_every_difference():
    assert settings_diff({"a": 1, "b": [1, 2]}, {"a": 1, "b": (1, 2)}) == []
    assert settings_diff({"a": 1, "b": 2}, {"a": 3, "c": 4}) == [
        "a: 1 before, 3 now", "b: 2 before, '(not set)' now", "c: '(not set)' before, 4 now"]


def test_adversarial_examples_are_stored_losslessly_and_compactly():
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (30, 1, 28, 28), generator=g) / 255.0 - 0.5)
    cases = {"unchanged": x.clone(), "fgsm": (x + 0.1).clamp(-0.5, 0.5),
             "dense": x + torch.randn(x.shape, generator=g) * 1e-3,
             "sparse": torch.where(torch.rand(x.shape, generator=g) < 0.02, 0.5, x)}
    for name, adv in cases.items():
        packed = pack_like(adv, x)
        back = unpack_like(packed, x)
        assert back.dtype == adv.dtype and torch.equal(back.view(torch.int32),
                                                       adv.view(torch.int32)), name
        assert packed["data"].numel() < 0.75 * adv.numel() * 4, name
    for dtype in (torch.float64, torch.bfloat16):
        adv = (x + 0.01).to(dtype)
        assert torch.equal(unpack_like(pack_like(adv, x), x).view(torch.uint8),
                           adv.view(torch.uint8))
    with pytest.raises(ValueError, match="shapes differ"):
        pack_like(x[:3], x)


# -------------------------------------------------------------------------------- C&W

def _run_with_stops(fn, stops):
    """Call fn(control) once per stop predicate (then once more without), each time
    continuing from the saved state; returns the result and the states saved."""
    store, states = {}, []

    def save(state):
        store["state"] = state
        states.append(state)

    for stop in list(stops) + [None]:
        budget = Budget(max_chunk=4, chunk_seconds=math.inf, stop_if=stop)
        try:
            return fn(WorkControl(budget, save, store.get("state"))), states
        except StopRequested:
            continue
    raise AssertionError("never finished")


def _same(a, b):
    adv_a, info_a = a
    adv_b, info_b = b
    assert torch.equal(adv_a, adv_b)
    for k, v in info_a.as_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, info_b.as_dict()[k]), k
        else:  # a ratio over no examples is NaN in both
            w = info_b.as_dict()[k]
            assert v == w or (v != v and w != w), (k, v, w)


@pytest.fixture(scope="module")
def digits_setup():
    model = digits_mlp("rce")
    x, y = digits_tensors()
    feats = model.features(x[:1500]).detach()
    det = KDensityDetector(objective="rce", per_class=50).fit(feats, y[:1500])
    det.class_medians(feats, y[:1500], 20)
    return model, x[1500:1540], det


def test_cw_stopped_anywhere_continues_to_the_same_result(digits_setup):
    model, x, _ = digits_setup
    kw = dict(c_init=1.0, binary_search_steps=3, max_iterations=10, return_info=True)
    straight = A.cw_l2(model, x, "random", **kw)
    # stops: mid-step (before the 3rd chunk: 8 of 10 iterations done), at the start of
    # search step 2 (after the 2 iterations left of step 1), then in the last step
    result, states = _run_with_stops(lambda ctl: A.cw_l2(model, x, "random", control=ctl, **kw),
                                     [nth("C&W", 3), nth("C&W", 2), nth("C&W", 3)])
    _same(straight, result)
    assert len(states) == 3
    first = states[0]
    assert (first["step"], first["it"]) == (0, 8)
    assert {"w", "adam", "c", "lower", "upper", "best_l2", "best_adv", "step_ok",
            "prev"} <= set(first)
    assert set(first["adam"]) == {"exp_avg", "exp_avg_sq", "step"}
    assert float(first["adam"]["step"]) == 8
    assert states[1]["step"] == 1 and states[1]["it"] == 0


def test_cw_continues_bit_identically_at_every_chunk_boundary(digits_setup):
    model, x, _ = digits_setup
    kw = dict(c_init=1.0, binary_search_steps=2, max_iterations=6, kappa=2.0,
              return_info=True)
    straight = A.cw_l2(model, x, "random", **kw)
    budget = Budget(max_chunk=4)
    _same(straight, A.cw_l2(model, x, "random", control=WorkControl(budget, None), **kw))
    assert len(budget.grants) >= 3  # abort-early may end a search step early
    for k in range(1, len(budget.grants) + 1):
        result, states = _run_with_stops(
            lambda ctl: A.cw_l2(model, x, "random", control=ctl, **kw), [nth("C&W", k)])
        _same(straight, result)
        assert len(states) == 1


def test_cw_wb_stopped_in_either_stage_continues_to_the_same_result(digits_setup):
    model, x, det = digits_setup
    kw = dict(stage1=dict(max_iterations=6, binary_search_steps=2),
              stage2=dict(max_iterations=9, binary_search_steps=2), return_info=True)
    straight = A.cw_wb(model, x, "random", det, **kw)
    result, states = _run_with_stops(
        lambda ctl: A.cw_wb(model, x, "random", det, control=ctl, **kw),
        [nth("C&W-wb stage 1", 2), nth("C&W-wb stage 2", 2), nth("C&W-wb stage 2", 4)])
    _same(straight, result)
    assert [s["stage"] for s in states] == [1, 2, 2]
    assert states[0]["search"]["it"] == 4
    s2 = states[1]
    assert s2["init"]["shape"] == list(x.shape) and s2["search"]["settings"]["extra"]
    assert {"fb_adv", "fb_score"} <= set(s2["search"])


def test_cw_stops_at_once_on_a_signal_mid_chunk(digits_setup):
    """A signal arriving during a forward pass: the iteration finishes, the state is
    saved before the next one, and continuing gives the uninterrupted result."""
    model, x, _ = digits_setup
    kw = dict(c_init=1.0, binary_search_steps=2, max_iterations=12, return_info=True)
    straight = A.cw_l2(model, x, "random", **kw)
    budget = Budget()
    calls = {"n": 0}

    class Signalling(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, inp):
            calls["n"] += 1
            if calls["n"] == 6:  # the clean pass, then the 5th iteration
                budget.request_stop("SIGTERM")
            return self.inner(inp)

    store = {}
    with pytest.raises(StopRequested, match="SIGTERM"):
        A.cw_l2(Signalling(), x, "random", control=WorkControl(
            budget, lambda s: store.update(state=s)), **kw)
    assert (store["state"]["step"], store["state"]["it"]) == (0, 5)
    resumed = A.cw_l2(model, x, "random", control=WorkControl(
        Budget(), lambda s: None, store["state"]), **kw)
    _same(straight, resumed)


def test_cw_refuses_a_state_saved_with_other_settings(digits_setup):
    model, x, _ = digits_setup
    store = {}
    kw = dict(binary_search_steps=1, abort_early=False)
    with pytest.raises(StopRequested):
        A.cw_l2(model, x, "random", max_iterations=8, **kw,
                control=WorkControl(Budget(stop_after=1, max_chunk=3),
                                    lambda s: store.update(state=s)))
    with pytest.raises(ValueError, match="other settings"):
        A.cw_l2(model, x, "random", max_iterations=9, **kw,
                control=WorkControl(Budget(), lambda s: None, store["state"]))
    with pytest.raises(ValueError, match="other target classes"):
        A.cw_l2(model, x, "random", max_iterations=8, seed=5, **kw,
                control=WorkControl(Budget(), lambda s: None, store["state"]))


def test_adam_state_round_trips_on_the_fallback_path_too():
    w = torch.zeros(5)
    adam = cw_module._Adam(w, 0.1)
    adam.opt = torch.optim.Adam([w], lr=0.1)  # force the optimizer-object path
    adam.step_t = adam.step_t.cpu()
    adam.opt.state[w] = {"step": adam.step_t, "exp_avg": adam.exp_avg,
                         "exp_avg_sq": adam.exp_avg_sq}
    adam.step(torch.ones(5))
    state = adam.state_dict()
    assert float(state["step"]) == 1 and torch.all(state["exp_avg"] != 0)


# --------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def small_digits():
    x_tr, y_tr, _, _ = load_digits_split()
    return x_tr[:300], y_tr[:300]


BASE = dict(objective="rce", model="resnet8", steps=24, lr_boundaries=[12],
            lr_values=[0.1, 0.01], progress=False, checkpoint_every=10)


def test_training_stopped_by_the_budget_continues_bit_identically(tmp_path, small_digits):
    x, y = small_digits
    straight, hist = train(TrainConfig(**BASE, checkpoint=str(tmp_path / "a.pt")), x, y)
    path = tmp_path / "b.pt"
    kind = "train resnet8 batch 128"
    steps_seen = []
    for stop in (nth(kind, 2), nth(kind, 3), None):  # stops after 5, then 15 steps
        try:
            resumed, hist_b = train(TrainConfig(**BASE, checkpoint=str(path)), x, y,
                                    budget=Budget(max_chunk=5, stop_if=stop))
        except StopRequested:
            steps_seen.append(torch.load(path, weights_only=True)["step"])
    assert steps_seen == [5, 15]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert hist["loss"] == hist_b["loss"] and hist["step"] == hist_b["step"]
    assert torch.equal(load_classifier(path)(x[:4]), straight(x[:4]))


def test_training_refuses_to_continue_with_other_settings(tmp_path, small_digits):
    x, y = small_digits
    path = tmp_path / "m.pt"
    with pytest.raises(StopRequested):
        train(TrainConfig(**BASE, checkpoint=str(path)), x, y, budget=Budget(stop_after=1,
                                                                             max_chunk=3))
    for change, listed in [({"objective": "ce"}, "objective: 'rce' before, 'ce' now"),
                           ({"seed": 3}, "seed: 0 before, 3 now"),
                           ({"batch_size": 64}, "batch_size: 128 before, 64 now"),
                           ({"steps": 30}, "steps: 24 before, 30 now"),
                           ({"lr_values": [0.2, 0.01]}, "lr_values"),
                           ({"model": "resnet32"}, "model: 'resnet8' before")]:
        with pytest.raises(ResumeMismatch, match="other settings") as exc:
            train(TrainConfig(**{**BASE, **change}, checkpoint=str(path)), x, y)
        assert listed in str(exc.value) and str(path) in str(exc.value)
    with pytest.raises(ResumeMismatch, match="other settings.*data"):
        train(TrainConfig(**BASE, checkpoint=str(path)), x[:200], y[:200])
    # forced: continues (and records it); another network cannot be forced
    _, hist = train(TrainConfig(**{**BASE, "seed": 3}, checkpoint=str(path)), x, y,
                    force_resume=True)
    assert hist["forced_resumes"][0]["at_step"] == 3
    with pytest.raises(ResumeMismatch, match="do not fit the network"):
        train(TrainConfig(**{**BASE, "model": "resnet32"}, checkpoint=str(path)), x, y,
              force_resume=True)
    # restart: starts over with the new settings
    _, hist = train(TrainConfig(**{**BASE, "objective": "ce", "steps": 2},
                                checkpoint=str(path)), x, y, resume=False)
    assert torch.load(path, weights_only=True)["config"]["objective"] == "ce"
    assert hist["step"] == [0, 1]


@pytest.mark.parametrize("n_new", [300, 120])
def test_forced_on_with_another_training_set_draws_full_batches(tmp_path, small_digits,
                                                                monkeypatch, n_new):
    """--force-resume with a training set of another size: the saved order was of the old
    set (with more images, batches came out short and then empty; with fewer, indices ran
    past its end). The run starts a fresh epoch over the new set from the saved generator
    and every batch is full."""
    from rce_fast import train as T
    x, y = small_digits
    path = tmp_path / "m.pt"
    cfg = TrainConfig(**{**BASE, "batch_size": 64}, checkpoint=str(path))
    with pytest.raises(StopRequested):
        train(cfg, x[:200], y[:200], budget=Budget(stop_after=1, max_chunk=2))
    drawn = []
    real = T._Sampler.next

    def spy(self, batch):
        out = real(self, batch)
        drawn.append(out.clone())
        return out
    monkeypatch.setattr(T._Sampler, "next", spy)
    train(cfg, x[:n_new], y[:n_new], force_resume=True)
    assert len(drawn) == BASE["steps"] - 2
    assert all(len(d) == 64 for d in drawn)
    seen = torch.cat(drawn)
    assert int(seen.min()) >= 0 and int(seen.max()) < n_new
    first_epoch = torch.cat(drawn)[:n_new]   # a permutation of the new set
    assert torch.equal(first_epoch.sort().values, torch.arange(n_new))


def test_finished_compact_checkpoint_holds_no_optimizer(tmp_path, small_digits):
    x, y = small_digits
    path = tmp_path / "m.pt"
    cfg = TrainConfig(**{**BASE, "steps": 3}, checkpoint=str(path))
    model, _ = train(cfg, x, y, keep_optimizer=False)
    state = torch.load(path, weights_only=True)
    assert "optimizer" not in state and state["step"] == 3
    again, _ = train(cfg, x, y)  # nothing left to do: the saved model
    assert torch.equal(again(x[:3]), model(x[:3]))
    with pytest.raises(ResumeMismatch, match="cannot be trained further"):
        train(TrainConfig(**{**BASE, "steps": 5}, checkpoint=str(path)), x, y,
              force_resume=True)


# ------------------------------------------------------------------ signals, for real

def _spawn(args, cwd):
    """The CLI in a subprocess; its stderr goes to cwd/stderr.txt (read while it runs)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    err = open(Path(cwd) / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "rce_fast", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=err, text=True)
    err.close()
    return proc


def _wait_for(ready, proc, timeout=600.0):
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early with status {proc.returncode}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("the process never got there")
        time.sleep(0.05)


def _finish(proc, cwd) -> str:
    proc.wait(timeout=300)
    return (Path(cwd) / "stderr.txt").read_text()


def test_a_signal_stops_training_cleanly_with_exit_status_3(tmp_path):
    sig = signal.SIGINT  # what Ctrl-C sends; the demo below gets SIGTERM
    ckpt = tmp_path / "m.pt"
    args = ["train", "--model", "resnet8", "--steps", "2000", "--out", str(ckpt)]
    proc = _spawn(args, tmp_path)
    # the progress bar is on stderr: training is under way (handlers long installed)
    _wait_for(lambda: "train rce" in (tmp_path / "stderr.txt").read_text(), proc)
    proc.send_signal(sig)
    err = _finish(proc, tmp_path)
    assert proc.returncode == 3, err[-2000:]
    assert "not finished, run the same command again" in err
    assert f"{signal.Signals(sig).name} received" in err and "Traceback" not in err
    state = torch.load(ckpt, weights_only=True)
    assert 0 <= state["step"] < 2000 and "optimizer" in state
    assert not list(tmp_path.glob(".*.tmp"))
    # a budget used up by the start-up alone: an error, not a stop that would repeat
    proc = _spawn(args + ["--time-budget", "0.5"], tmp_path)
    err = _finish(proc, tmp_path)
    assert proc.returncode == 2 and "too small" in err and err.count("\n") == 1, err[-2000:]
    assert torch.load(ckpt, weights_only=True)["step"] == state["step"]


def test_a_signal_during_the_attacks_of_a_demo_saves_and_exits_3(tmp_path):
    out = tmp_path / "demo"
    proc = _spawn(["demo", "--steps", "20", "--n-attack", "8", "--out", str(out),
                   "--quiet"], tmp_path)
    _wait_for((out / "adversarial" / "ce_fgsm.pt").exists, proc)
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc, tmp_path)
    assert proc.returncode == 3, err[-2000:]
    assert "not finished, run the same command again" in err
    import json
    state = json.loads((out / "state.json").read_text())
    assert "ce/FGSM" in state["units"]
    assert state["sessions"][-1]["result"] == "stopped: SIGTERM received"
    assert not list(out.rglob(".*.tmp"))
