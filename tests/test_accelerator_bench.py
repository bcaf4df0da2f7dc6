"""benchmarks/accelerator.py runs end to end on the CPU (tiny config, smallest sizes) and reports every row;
its goal column judges only what the goals are stated for."""

import json
import math
import types

from benchmarks import accelerator as acc


def positive(x) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def test_accelerator_benchmark_tiny_has_every_row(tmp_path, capsys):
    out = tmp_path / "accelerator.json"
    # fp32 sampler and training rows: XLA:CPU compiles bf16 programs several times slower, and
    # compiling is most of this test's time
    result = acc.main(["--config", "tiny", "--dtype", "fp32", "--resolution", "64", "--official-resolution", "64",
                       "--batches", "1", "--steps", "2", "--unet-batch", "2", "--train-resolutions", "32",
                       "--iters", "1", "--train-steps", "1", "--warmup", "0", "--torch-cpu", "--json", str(out)])
    printed = capsys.readouterr().out

    rows = {r["key"]: r for r in result["rows"]}
    jax_rows = {"paper_b1", "official", "t2i_jax", "unet_bf16", "unet_fp32", "train_32px"}
    torch_rows = {"t2i_diffusers", "unet_diffusers", "unet_speedup"}
    assert list(rows) == ["paper_b1", "official", "t2i_jax", "t2i_diffusers", "unet_bf16", "unet_fp32",
                          "unet_diffusers", "unet_speedup", "train_32px"]
    for key in jax_rows:
        assert positive(rows[key]["value"]), rows[key]
    for key in jax_rows:
        assert positive(rows[key]["compile_s"]), rows[key]
    for key in ("unet_bf16", "unet_fp32"):
        d = rows[key]["details"]
        assert positive(d["flops"]) and positive(d["tflops"]) and d["mfu"] is None  # no peak for a CPU
    assert rows["train_32px"]["unit"] == "steps/s"
    for key in torch_rows:  # measured, or n/a with the reason
        assert positive(rows[key]["value"]) or (rows[key]["value"] is None and rows[key]["reason"]), rows[key]
    if rows["unet_speedup"]["value"] is not None:
        assert rows["unet_speedup"]["value"] == rows["unet_diffusers"]["value"] / rows["unet_bf16"]["value"]

    # goals are shown where a row has one, and not judged on a CPU
    assert rows["official"]["goal"] and rows["official"]["met"] is None
    assert "GPU" in rows["official"]["met_note"]

    for key, row in rows.items():
        assert key in printed and acc.measured_text(acc.Row(**row)) in printed
    assert "python -m benchmarks.accelerator --config tiny" in printed
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"])) and saved["table"] in printed


def test_goals_are_judged_on_a_gpu_at_their_sizes_only():
    rows = {
        "paper_b8": acc.Row("paper_b8", "", "s/img", value=0.25, sizes=dict(resolution=512, batch=8, steps=50)),
        "official": acc.Row("official", "", "s/img", value=1.5, sizes=dict(resolution=768, batch=1, steps=50)),
        "train_768px": acc.Row("train_768px", "", "steps/s", value=20.0, sizes=dict(resolution=768, batch=1)),
        "unet_bf16": acc.Row("unet_bf16", "", "s/call", value=0.1, details=dict(mfu=0.45)),
        "unet_speedup": acc.Row("unet_speedup", "", "x", reason="diffusers is not importable"),
    }
    bench = types.SimpleNamespace(rows=rows, args=types.SimpleNamespace(config="sd21"))
    acc.Benchmark.judge(bench, "gpu")
    assert rows["paper_b8"].met is True and rows["official"].met is False
    assert rows["train_768px"].met is False  # 4000 steps at 20 steps/s: 3.3 min
    assert rows["unet_bf16"].met is True
    assert rows["unet_speedup"].met is None and rows["unet_speedup"].met_note == "not measured"

    rows["paper_b8"].sizes["steps"] = 2  # a smoke run at the goal's batch is not judged
    acc.Benchmark.judge(bench, "gpu")
    assert rows["paper_b8"].met is None and "sizes differ" in rows["paper_b8"].met_note

    bench.args.config = "tiny"
    acc.Benchmark.judge(bench, "gpu")
    assert rows["official"].met is None and "SD 2.1" in rows["official"].met_note
