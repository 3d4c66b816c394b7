"""The step cache through generate() and the CLI: threshold 0 changes nothing, counters are reported."""

from __future__ import annotations

import torch

import wanx
from wanx import cli
from wanx.media import read_mp4


def test_generate_with_magcache_threshold_zero_is_uncached_and_reports(tmp_path, capsys):
    ratios = tmp_path / "demo_ratios.json"  # the demo model is no official size: measure its ratios first
    assert cli.main(["calibrate", "magcache", "--out", str(ratios)]) == 0 and ratios.is_file()
    capsys.readouterr()
    pipe = wanx.load_pipeline(None, device="cpu")
    plain = pipe.generate("a red circle moving left", seed=4, progress=False)
    cached = pipe.generate("a red circle moving left", seed=4, progress=False, cache=f"magcache:0,ratios={ratios}")
    assert torch.equal(plain.tensor, cached.tensor)
    stats = cached.stats["cache"]
    assert stats["skipped"] == 0 and stats["computed"] == stats["evaluations"] > 0
    assert cached.metadata["cache"]["kind"] == "magcache" and plain.metadata["cache"] is None
    out = tmp_path / "c.mp4"
    assert cli.main(["generate", "a red circle moving left", "--cache", f"magcache:0.5,ratios={ratios}",
                     "--save_file", str(out)]) == 0
    assert "block-stack runs computed" in capsys.readouterr().out
    assert read_mp4(out)[2]["cache"]["kind"] == "magcache"
    assert cli.main(["generate", "x", "--cache", "teacache"]) == 2
    assert "--cache" in capsys.readouterr().err
