from __future__ import annotations

import argparse
import json

import pytest

from rollcast.server.cli import main
from rollcast.server.cli_args import add_model_args, worker_spec


def lines(capsys) -> list[dict]:
    return [json.loads(x) for x in capsys.readouterr().out.splitlines()]


def test_model_streams_exact_number_of_blocks(capsys):
    assert main(["model", "--blocks", "3", "--resolution", "64x64", "--steps", "2"]) == 0
    out = lines(capsys)
    assert out[0]["config"] == "tiny" and out[0]["latent_hw"] == [8, 8]
    assert [o["frames_done"] for o in out[1:]] == [3, 6, 9]
    assert all(o["forwards"] == 3 for o in out[1:])  # 2 steps + context pass


@pytest.mark.parametrize(("flags", "policy", "window", "fpb"), [
    ([], "longlive", 9, None),  # tiny's own default: its weights stream best with a 9-frame window
    (["--config", "wan-1.3b"], "self-forcing", 18, None),
    (["--policy", "self-forcing"], "self-forcing", 18, None),
    (["--config", "wan-1.3b", "--policy", "streamdiffusionv2"], "streamdiffusionv2", 3, 1),
])
def test_cache_policy_defaults_to_the_models(flags, policy, window, fpb) -> None:
    p = argparse.ArgumentParser()
    add_model_args(p, checkpoint_help="")
    spec = worker_spec(p.parse_args([*flags, "--device", "cpu"]))
    assert (spec.policy.name, spec.policy.window_frames, spec.frames_per_block) == (policy, window, fpb)


def test_model_runs_a_checkpoint_it_wrote(tmp_path, capsys):
    ck = tmp_path / "sharded"
    assert main(["checkpoint", "synth", str(ck), "--format", "safetensors-sharded"]) == 0
    assert main(["checkpoint", "inspect", str(ck)]) == 0
    info = lines(capsys)[-1]
    assert info["fits"] and info["config"] == "tiny" and info["params"] == 963_776
    assert main(["model", "--checkpoint", str(ck), "--blocks", "1", "--resolution", "64x64",
                 "--policy", "streamdiffusionv2"]) == 0
    out = lines(capsys)
    assert out[0]["frames_per_block"] == 1 and out[-1]["frames_done"] == 1


def test_bad_inputs_exit_2_with_a_message(tmp_path, capsys):
    assert main(["model", "--resolution", "100x7"]) == 2
    assert "multiples of 16x16" in capsys.readouterr().err
    assert main(["model", "--resolution", "wide"]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert main(["checkpoint", "inspect", str(bad)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["model", "--blocks", "0"])
    assert e.value.code == 2


def test_simulate_writes_a_report_and_rejects_bad_flags(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert main(["simulate", "--policy", "fifo", "--rate", "0.2", "--duration", "20",
                 "--session-seconds", "4", "--vae", "tiny", "--seed", "2", "--json", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    report = json.loads(out.read_text())
    assert summary["policy"] == report["policy"] == "fifo"
    assert report["sessions"] == len(report["per_session"]) > 0
    assert 0 <= report["slo_attainment"] <= 1 and report["mean_batch_size"] >= 1
    assert main(["simulate", "--cost-model", "no-such-preset"]) == 2
    assert "no-such-preset" in capsys.readouterr().err
    assert main(["simulate", "--rates", "0.1,x"]) == 2
    assert "--rates must be comma-separated numbers" in capsys.readouterr().err


def test_serve_bad_flags_exit_2(capsys) -> None:  # type: ignore[no-untyped-def]
    from rollcast.server.cli import main

    assert main(["serve", "--max-utilization", "2"]) == 2
    assert "--max-utilization must lie in (0, 1]" in capsys.readouterr().err
    assert main(["serve", "--cost-model", "/nonexistent.json"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_serve_config_defaults() -> None:
    import argparse

    from rollcast.server import cli_serve

    p = argparse.ArgumentParser()
    cli_serve.add_arguments(p)
    cfg = cli_serve.serve_config(p.parse_args(["--device", "cpu"]))
    assert (cfg.host, cfg.port, cfg.policy) == ("127.0.0.1", 8000, "slo")
    assert cfg.pipeline.worker.config.name == "tiny"
    assert cfg.pipeline.worker.resolution == (128, 128)  # the shipped model's training size
    assert cfg.sessions.ttff_s == 2.0 and cfg.sessions.max_sessions_per_client == 4
