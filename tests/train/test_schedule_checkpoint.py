import random

import numpy as np
import pytest
import torch

from parallax.train import checkpoint as ckpt_mod
from parallax.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from parallax.train.schedule import LRSchedule, build_scheduler


def test_cosine_and_wsd_shapes():
    cos = LRSchedule("cosine", total=100, warmup=10, min_ratio=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(55) == pytest.approx(0.55)
    assert cos(100) == pytest.approx(0.1)
    wsd = LRSchedule("wsd", total=100, warmup=10, cooldown=0.2)
    assert [wsd(s) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert wsd(80) == pytest.approx(0.95) and wsd(99) == pytest.approx(0.0)
    assert LRSchedule("constant", 10, warmup=0)(9) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        LRSchedule("linear", 10)


def test_scheduler_state_round_trip(tmp_path):
    def make():
        p = torch.nn.Parameter(torch.ones(2, 2))
        opt = torch.optim.AdamW([{"params": [p], "lr": 0.1}, {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0.01}])
        return opt, build_scheduler(opt, "wsd", 20, warmup=3)
    opt, sched = make()
    for _ in range(7):
        opt.step()
        sched.step()
    save_checkpoint({"s": sched.state_dict(), "o": opt.state_dict()}, tmp_path / "c.pt")
    state = load_checkpoint(tmp_path / "c.pt")
    opt2, sched2 = make()
    opt2.load_state_dict(state["o"])
    sched2.load_state_dict(state["s"])
    for _ in range(10):
        sched.step()
        sched2.step()
        assert sched.get_last_lr() == sched2.get_last_lr()


def test_rng_state_round_trip(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    save_checkpoint({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1, "w": torch.arange(4.0)}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


class Evil:
    pass


def test_load_refuses_arbitrary_objects(tmp_path):
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        load_checkpoint(tmp_path / "evil.pt")


def test_previous_checkpoint_is_kept_until_the_new_one_is_verified(tmp_path, monkeypatch):
    latest, previous = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    for step in (1, 2):
        save_checkpoint({"step": step}, latest, keep_previous=previous)
    assert load_checkpoint(latest)["step"] == 2 and load_checkpoint(previous)["step"] == 1

    def unreadable(path, map_location="cpu"):
        raise ckpt_mod.CheckpointError(f"{path} reads back wrong")

    monkeypatch.setattr(ckpt_mod, "read_checkpoint", unreadable)
    with pytest.raises(ckpt_mod.CheckpointError, match="reads back wrong"):
        save_checkpoint({"step": 3}, latest, keep_previous=previous)
    monkeypatch.undo()
    assert load_checkpoint(latest)["step"] == 2 and load_checkpoint(previous)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_load_latest_falls_back_and_reports_why(tmp_path):
    save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path / "checkpoint.pt")
    save_checkpoint({"step": 2, "w": torch.ones(3)}, tmp_path / "checkpoint.pt",
                    keep_previous=tmp_path / "checkpoint.prev.pt")
    state, path, problems = ckpt_mod.load_latest_checkpoint(tmp_path, required={"step": int, "w": torch.Tensor})
    assert state["step"] == 2 and path.name == "checkpoint.pt" and problems == []
    (tmp_path / "checkpoint.pt").write_bytes((tmp_path / "checkpoint.pt").read_bytes()[:100])
    state, path, problems = ckpt_mod.load_latest_checkpoint(tmp_path)
    assert state["step"] == 1 and path.name == "checkpoint.prev.pt" and "checkpoint.pt cannot be read" in problems[0]
    with pytest.raises(ckpt_mod.CheckpointError, match="no readable checkpoint.*lacks optimizer"):
        ckpt_mod.load_latest_checkpoint(tmp_path, required={"optimizer": dict})
    with pytest.raises(ckpt_mod.CheckpointError, match="no readable checkpoint.*holds a w of the wrong type"):
        ckpt_mod.load_latest_checkpoint(tmp_path, required={"w": dict})
    assert ckpt_mod.load_latest_checkpoint(tmp_path / "empty") == (None, None, [])
