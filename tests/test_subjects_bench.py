"""The many-subject benchmark runs end to end on the tiny config (its figures live in BENCHMARKS.md)."""

from benchmarks import subjects as bench


def test_multi_subject_throughput_smoke(capsys):
    result = bench.main(["throughput", "--subjects", "3", "--steps", "1", "--resolution", "32"])
    assert result["subjects"] == 3 and result["sequential_s"] > 0 and result["many_s"] > 0
    assert result["ratio"] > 0
    assert "subjects/h" in capsys.readouterr().out


def test_step_cost_from_shapes_alone():
    official = bench.main(["cost", "--config", "tiny", "--resolution", "64"])
    paper = bench.main(["cost", "--config", "tiny", "--resolution", "64", "--preset", "paper"])
    assert official["flops_per_step"] > 0
    # the paper's L_reg runs preservation sentences through the tuned encoder as well
    assert paper["flops_per_step"] > official["flops_per_step"]
    assert official["trainable_state_gib"] == 16 * official["text_encoder_params"] / 2**30
