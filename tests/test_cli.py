"""The CLI's error contract: a user's mistake is one line (exit 2), a bug shows its traceback
(exit 1), and -v always shows tracebacks. Fast: no Ray."""

from __future__ import annotations

import pytest

from synthfar_ray import train
from synthfar_ray.cli import main


@pytest.fixture()
def bad_config(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\nstorage_path: /tmp/x\nplan: mix\nsynthetic: /data/s\n")  # mix without `real`
    return str(cfg)


def test_user_mistake_is_one_line(bad_config, capsys):
    assert main(["train", bad_config]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("synthfar train: error: invalid config")
    assert "real" in err


def test_verbose_shows_the_traceback(bad_config, capsys):
    assert main(["-v", "train", bad_config]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "synthfar train: error:" in err


def test_a_bug_is_not_hidden(bad_config, tmp_path, capsys, monkeypatch):
    # A stand-in bug (the only mock here: no real code path is known to be broken, by design).
    def broken(cfg, callbacks=None):
        raise KeyError("internal")

    monkeypatch.setattr(train, "run_train", broken)
    good = tmp_path / "good.yaml"
    good.write_text(f"name: x\nstorage_path: {tmp_path}\nplan: real\nreal: {tmp_path}\n")
    assert main(["train", str(good)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'internal'" in err and "unexpected error" in err


def test_relative_paths_are_absolute_after_validation(tmp_path, monkeypatch):
    """Resolved on the driver at validation: what is shipped to workers and trials is absolute."""
    from synthfar_ray.train import TrainConfig

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(name="r", storage_path="runs", plan="real", real="data/real", model={"pretrained": "w.pth"})
    assert cfg.storage_path == str(tmp_path / "runs") and cfg.real == str(tmp_path / "data" / "real")
    assert cfg.model.pretrained == str(tmp_path / "w.pth")
    assert TrainConfig(name="r", storage_path="s3://b/runs", plan="real", real="s3://b/real",
                       model={"pretrained": "torchvision"}).model.pretrained == "torchvision"


def test_relative_output_in_a_job_working_dir_is_refused(tmp_path, monkeypatch):
    """Ray unpacks a job's --working-dir under .../runtime_resources/working_dir_files/<pkg>: a relative
    output there is refused; absolute outputs and relative inputs are fine."""
    from synthfar_ray.config import ConfigError, load_config
    from synthfar_ray.train import TrainConfig

    job_dir = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    with pytest.raises(ConfigError, match=r"relative output path 'runs' .*s3://"):
        load_config(TrainConfig, None, ["name=r", "storage_path=runs", "plan=real", "real=data/real"])
    cfg = load_config(TrainConfig, None, [f"name=r", f"storage_path={tmp_path}/runs", "plan=real", "real=data/real"])
    assert cfg.real == str(job_dir / "data" / "real")
