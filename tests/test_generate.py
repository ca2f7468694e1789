"""`rollcast generate` end to end on CPU with the tiny model: exact frame counts, determinism,
both output formats, video-to-video, and exit code 2 with nothing left behind for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from rollcast.server.cli import main

FAST = ["--resolution", "64x64", "--steps", "1", "--no-progress"]


def generate(capsys, *args: str) -> dict:
    assert main(["generate", *args, *FAST]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def fail(capsys, *args: str) -> str:
    assert main(["generate", *args, *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rollcast: error: ") and "\n" not in err  # one line
    return err


@pytest.mark.parametrize("frames", [1, 10, 21])
def test_t2v_npy_has_exactly_n_frames(tmp_path: Path, capsys, frames: int) -> None:
    info = generate(capsys, "--prompt", "a red circle", "--frames", str(frames),
                    "-o", str(tmp_path / "a.npy"))
    out = np.load(tmp_path / "a.npy")
    assert out.shape == (frames, 64, 64, 3) and out.dtype == np.uint8
    assert info["frames"] == frames and info["mode"] == "t2v" and info["vae"] == "tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]


def test_same_seed_same_frames(tmp_path: Path, capsys) -> None:
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        generate(capsys, "--prompt", "a red circle", "--frames", "9", "--seed", seed,
                 "-o", str(tmp_path / f"{name}.npy"))
    a, b, c = (np.load(tmp_path / f"{n}.npy") for n in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    generate(capsys, "--prompt", "a blue square", "--frames", "9", "--seed", "1",
             "-o", str(tmp_path / "d.npy"))
    assert not np.array_equal(a, np.load(tmp_path / "d.npy"))  # the prompt matters


def test_t2v_mp4_is_h264_at_the_model_fps(tmp_path: Path, capsys) -> None:
    generate(capsys, "--prompt", "waves", "--frames", "14", "-o", str(tmp_path / "a.mp4"))
    with av.open(str(tmp_path / "a.mp4")) as f:
        stream = f.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert float(stream.average_rate) == 16
        assert (stream.width, stream.height) == (64, 64)
        assert sum(1 for _ in f.decode(stream)) == 14


def test_wan_vae_is_selectable(tmp_path: Path, capsys) -> None:
    info = generate(capsys, "--prompt", "x", "--frames", "5", "--vae", "wan", "-o", str(tmp_path / "a.npy"))
    assert info["vae"] == "wan" and np.load(tmp_path / "a.npy").shape == (5, 64, 64, 3)


def test_v2v_from_npy_and_mp4(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (11, 64, 64, 3), dtype=np.uint8)
    np.save(tmp_path / "in.npy", frames)
    info = generate(capsys, "--input", str(tmp_path / "in.npy"), "--prompt", "oil painting",
                    "-o", str(tmp_path / "out.npy"))
    out = np.load(tmp_path / "out.npy")
    assert out.shape == (11, 64, 64, 3) and info["mode"] == "v2v"
    generate(capsys, "--input", str(tmp_path / "in.npy"), "--prompt", "oil painting",
             "-o", str(tmp_path / "again.npy"))
    np.testing.assert_array_equal(out, np.load(tmp_path / "again.npy"))
    generate(capsys, "--input", str(tmp_path / "in.npy"), "--prompt", "oil painting", "--frames", "6",
             "-o", str(tmp_path / "short.mp4"))
    with av.open(str(tmp_path / "short.mp4")) as f:
        assert sum(1 for _ in f.decode(video=0)) == 6
    # A video file as input: 1 s at 30 fps is resampled to the model's 16 fps.
    with av.open(str(tmp_path / "in.mp4"), "w") as f:
        s = f.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        for i in range(30):
            img = np.full((64, 96, 3), i * 8, np.uint8)
            f.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        f.mux(s.encode(None))
    generate(capsys, "--input", str(tmp_path / "in.mp4"), "--prompt", "x", "-o", str(tmp_path / "o.npy"))
    assert np.load(tmp_path / "o.npy").shape == (16, 64, 64, 3)


def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.npy"
    assert "--frames must be a positive" in fail(capsys, "--prompt", "x", "--frames", "0", "-o", str(out))
    assert "--frames must be a positive" in fail(capsys, "--prompt", "x", "--frames", "-3", "-o", str(out))
    err = fail(capsys, "--prompt", "x", "--input", str(tmp_path / "none.mp4"), "-o", str(out))
    assert "none.mp4: no such file" in err
    (tmp_path / "junk.mp4").write_bytes(b"\x00garbage" * 10)
    assert "junk.mp4: cannot decode" in fail(capsys, "--prompt", "x", "--input", str(tmp_path / "junk.mp4"),
                                             "-o", str(out))
    assert main(["generate", "--prompt", "x", "--resolution", "100x60", "-o", str(out), "--no-progress"]) == 2
    assert "resolution 100x60 must be positive multiples of 16x16" in capsys.readouterr().err
    (tmp_path / "ckpt").mkdir()
    err = fail(capsys, "--prompt", "x", "--checkpoint", str(tmp_path / "ckpt"), "-o", str(out))
    assert "ckpt" in err and "no DiT checkpoint" in err
    assert "unsupported file type '.gif'" in fail(capsys, "--prompt", "x", "-o", str(tmp_path / "a.gif"))
    err = fail(capsys, "--prompt", "x", "--random-weights", "--checkpoint", str(tmp_path / "ckpt"),
               "-o", str(out))
    assert "--random-weights and --checkpoint exclude each other" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "junk.mp4"]


def test_a_model_directory_reproduces_the_checkpoint_free_run(tmp_path: Path, capsys) -> None:
    """`checkpoint synth --model-dir` writes every component under its published name with the
    weights seed 0 gives them; generating from that directory gives the very same frames as the
    checkpoint-free run with `--random-weights` (without it, `tiny` loads its shipped model)."""
    ck = tmp_path / "Wan-tiny"
    assert main(["checkpoint", "synth", str(ck), "--model-dir", "--format", "pt-generator-ema"]) == 0
    capsys.readouterr()
    names = {p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file()}
    assert {"model.pt", "config.json", "Wan2.1_VAE.pth", "taew2_1.safetensors",
            "models_t5_umt5-xxl-enc-bf16.pth"} <= names
    for vae in ("tiny", "wan"):
        args = ["--prompt", "a red circle", "--frames", "6", "--seed", "4", "--vae", vae]
        generate(capsys, *args, "--random-weights", "-o", str(tmp_path / f"free-{vae}.npy"))
        generate(capsys, *args, "--checkpoint", str(ck), "-o", str(tmp_path / f"dir-{vae}.npy"))
        free, loaded = (np.load(tmp_path / f"{k}-{vae}.npy") for k in ("free", "dir"))
        np.testing.assert_array_equal(free, loaded)
    (ck / "Wan2.1_VAE.pth").unlink()
    err = fail(capsys, "--prompt", "x", "--vae", "wan", "--checkpoint", str(ck),
               "-o", str(tmp_path / "x.npy"))
    assert "no wan VAE weights (Wan2.1_VAE.pth)" in err
    (ck / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"garbage")
    err = fail(capsys, "--prompt", "x", "--checkpoint", str(ck), "-o", str(tmp_path / "x.npy"))
    assert "models_t5_umt5-xxl-enc-bf16.pth" in err
    assert not (tmp_path / "x.npy").exists()


def test_prompt_switch_flags(tmp_path: Path, capsys) -> None:
    base = ["--prompt", "a red circle", "--frames", "21", "--seed", "2"]
    generate(capsys, *base, "-o", str(tmp_path / "a.npy"))
    generate(capsys, *base, "--switch", "9:a blue square", "--transition-blocks", "2",
             "-o", str(tmp_path / "b.npy"))
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    np.testing.assert_array_equal(a[:9], b[:9])
    assert not np.array_equal(a[9:], b[9:])
    assert "FRAME:PROMPT" in fail(capsys, *base, "--switch", "soon:x", "-o", str(tmp_path / "c.npy"))
    assert "--transition-blocks must be >= 0" in fail(capsys, *base, "--transition-blocks", "-1",
                                                      "-o", str(tmp_path / "c.npy"))
