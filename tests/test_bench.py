"""The benchmark runs end to end on the tiny config, and our UNet matches diffusers on the same weights."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from benchmarks import bench  # noqa: E402


def test_bench_unet_tiny_end_to_end(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    result = bench.main(["unet", "--config", "tiny", "--iters", "1", "--warmup", "0", "--threads", "1",
                         "--json", str(out_json)])

    assert set(bench.RESULT_KEYS) <= set(result)
    assert result["config"] == "tiny" and result["batch"] == 2 and result["latent"] == 16
    assert result["dtype"] == "fp32" and result["torch_dtype"] == "float32"
    assert result["params"] > 0
    assert result["jax_compile_s"] > 0
    assert len(result["jax_times_s"]) == 1 and len(result["torch_times_s"]) == 1
    assert result["jax_median_s"] > 0 and result["torch_median_s"] > 0
    assert result["ratio_torch_over_jax"] == pytest.approx(result["torch_median_s"] / result["jax_median_s"])
    # same weights, same inputs: fp32 outputs agree to well under 1e-4 of the output scale
    assert result["max_abs_ref"] > 0
    assert result["rel_diff"] < 1e-4, result

    printed = capsys.readouterr().out
    assert "ratio torch/jax" in printed and "max abs diff" in printed
    assert "python -m benchmarks.bench unet --config tiny" in printed

    assert json.loads(out_json.read_text())["rel_diff"] == pytest.approx(result["rel_diff"])


def test_bench_demo_step_times_each_variant(monkeypatch, capsys):
    # A smoke test: the smallest recipe (two levels, cross-attention at 4², 8² latents) against one
    # narrower variant with the grounding loss at twice the image side, so the test compiles two
    # small steps; the real recipe and variants are for `python -m benchmarks.bench demo-step`.
    from cones_jax.demo import base_model

    small = dict(sample_size=8, block_out_channels=[16, 32], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[4, 4])
    for key, value in small.items():
        monkeypatch.setitem(base_model.UNET, key, value)
    narrow = dict(unet=dict(block_out_channels=[8, 16]), grounding_weight=0.05, latent_scale=2)
    monkeypatch.setattr(bench, "DEMO_VARIANTS", {"recipe": {}, "narrow": narrow})
    result = bench.main(["demo-step", "--batch", "1", "--iters", "1"])
    assert set(result["median_s"]) == {"recipe", "narrow"} and all(v > 0 for v in result["median_s"].values())
    assert result["params"]["narrow"] < result["params"]["recipe"]
    printed = capsys.readouterr().out
    assert "python -m benchmarks.bench demo-step --batch 1 --iters 1" in printed and "x the recipe" in printed


def test_bench_demo_encode_times_each_chunk(capsys):
    # a smoke test on 6 scenes; the figures are for `python -m benchmarks.bench demo-encode`
    result = bench.main(["demo-encode", "--images", "6", "--chunks", "4", "2", "--iters", "1"])
    assert set(result["median_s"]) == {4, 2} and all(v > 0 for v in result["median_s"].values())
    assert all(len(t) == 1 for t in result["times_s"].values())
    printed = capsys.readouterr().out
    assert "python -m benchmarks.bench demo-encode --images 6 --chunks 4 2 --iters 1" in printed
    assert "x chunk 4" in printed
    with pytest.raises(SystemExit, match="--chunks"):
        bench.main(["demo-encode", "--chunks", "0"])
