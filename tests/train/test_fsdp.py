"""`torchrun train.py --fsdp`: FSDP2 training equals DDP training on the same data."""
import sys

from tests.test_train_script import TINY, _free_port, run, summary


def torchrun(args, tmp_path, out):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "train.py")
    proc = run([*TINY, "--steps", "3", "--eval-every", "3", "--sample-tokens", "4", "--out", str(out), *args],
               tmp_path, timeout=120, launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return summary(proc.stdout)


def test_fsdp_run_matches_ddp_run(tmp_path):
    ddp = torchrun([], tmp_path, tmp_path / "ddp")
    fsdp = torchrun(["--fsdp"], tmp_path, tmp_path / "fsdp")
    assert fsdp["world_size"] == "2" and fsdp["step"] == "3"
    for key in ("train_loss", "val_loss"):
        assert abs(float(fsdp[key]) - float(ddp[key])) < 1e-3, key
    assert (tmp_path / "fsdp" / "checkpoint.pt").exists() and (tmp_path / "fsdp" / "sample.txt").exists()


def test_fsdp_without_torchrun_exits_2_naming_the_flag(tmp_path, capsys, monkeypatch):
    from parallax.cli import main

    monkeypatch.setenv("PARALLAX_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    assert main([*TINY, "--data", str(text), "--fsdp", "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    assert "--fsdp" in capsys.readouterr().err
