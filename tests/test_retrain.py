"""`python -m cones_jax.demo.retrain`: the shipped demo model's lineage replayed sitting by sitting,
and base_model's `--stop-at`."""

import json
import os

import pytest

from cones_jax.demo import base_model, retrain

DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "demo_model")

# A two-sitting lineage through the same code path as the shipped one: the first sitting stops early
# in a longer schedule and is resumed in its workdir with a longer one still (as the third run was);
# the second continues from its export and stops early too (as the fifth sitting did).
_TINY = dict(scenes=24, batch=2, lr=5e-4, weighting="clipped_v", single_object_fraction=0.5,
             timestep_power=1.0, grounding_weight=0.0)
TINY_CHAIN = (
    dict(name="from scratch", runs=(dict(_TINY, vae_steps=2, vae_batch=4, steps=4, stop_at=2),
                                    dict(_TINY, vae_steps=2, vae_batch=4, steps=5))),
    dict(name="continued", runs=(dict(_TINY, steps=4, stop_at=3),)),
)


def test_the_lineage_adds_up_to_the_shipped_model():
    steps = retrain.plan(retrain.lineage())
    assert [s.total for s in steps] == [5400, 11400, 17400, 17800, 19000, 25000, 31000, 37000, 41000,
                                         45000, 49000]
    assert [s.prior for s in steps[1:]] == [s.total for s in steps[:-1]]
    if os.path.exists(os.path.join(DEMO_MODEL, base_model.TRAINING_RECORD)):
        assert retrain.recorded_steps(DEMO_MODEL) == steps[-1].total
    for scale in (1.0, 1e-3):  # every invocation, scaled down or not, is one base_model accepts
        for s in retrain.plan(retrain.lineage(), scale):
            for run in s.runs:
                args = base_model.parse_args(["--workdir", "unused"] + retrain.flags(run))
                assert args.scenes >= 1 and args.steps >= 1 and (args.stop_at or 1) >= 1
    first = retrain.plan(retrain.lineage(), 1e-3)[0]
    assert first.runs[0]["stop_at"] < first.runs[0]["steps"] < first.runs[1]["steps"]


def test_stop_at_outside_the_schedule_is_a_one_line_error(capsys):
    for bad in ("0", "11"):
        with pytest.raises(SystemExit) as e:
            base_model.main(["--workdir", "unused", "--steps", "10", "--stop-at", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].endswith(f"error: --stop-at {bad} is not in [1, --steps 10]"), err
        assert not err[-1].startswith("Traceback")
    assert base_model.parse_args(["--workdir", "unused", "--steps", "10", "--stop-at", "10"]).stop_at == 10


def test_retrain_replays_the_sittings_and_resumes(tmp_path, monkeypatch, capsys):
    # a small architecture, quick to compile: the test checks the chain, not the model
    for key, value in (("block_out_channels", [8, 16]), ("attention_head_dim", [4, 4]),
                       ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"]),
                       ("up_block_types", ["CrossAttnUpBlock2D", "UpBlock2D"])):
        monkeypatch.setitem(base_model.UNET, key, value)
    monkeypatch.setitem(base_model.VAE, "block_out_channels", [16, 16])
    text_config = base_model.text_config
    monkeypatch.setattr(base_model, "text_config", lambda vocab: dict(text_config(vocab), num_hidden_layers=1))
    monkeypatch.setattr(retrain, "lineage", lambda: TINY_CHAIN)
    schedules, exported, calls = [], [], []
    optimizer, export, main = base_model.optimizer, base_model.export, base_model.main

    def record_optimizer(lr, warmup, steps):
        if lr == _TINY["lr"]:  # the UNet stage's
            schedules.append(steps)
        return optimizer(lr, warmup, steps)

    def record_export(out, **kw):
        exported.append(kw["unet_steps"])
        return export(out, **kw)

    def record_main(argv):
        calls.append(argv)
        return main(argv)

    monkeypatch.setattr(base_model, "optimizer", record_optimizer)
    monkeypatch.setattr(base_model, "export", record_export)
    monkeypatch.setattr(base_model, "main", record_main)
    work, out = str(tmp_path / "work"), str(tmp_path / "model")

    assert retrain.main(["--workdir", work, "--out", out]) == 0
    # each run exported the steps it took: 2 (stopped early), 5 (resumed), 5 + 3 (stopped early)
    assert exported == [2, 5, 8]
    # the stopped runs' learning-rate schedules spanned their --steps, not --stop-at
    assert schedules == [4, 5, 4]
    first, second = (os.path.join(work, f"sitting_{k}") for k in (1, 2))
    with open(os.path.join(first, "sitting.json")) as f:
        assert json.load(f) == {"init_from": None, "prior_unet_steps": 0}
    with open(os.path.join(second, "sitting.json")) as f:
        assert json.load(f) == {"init_from": os.path.abspath(os.path.join(first, "export")), "prior_unet_steps": 5}
    assert [c[c.index("--init-from") + 1] if "--init-from" in c else None for c in calls] == \
        [None, None, os.path.join(first, "export")]
    assert retrain.recorded_steps(os.path.join(first, "export")) == 5
    assert retrain.recorded_steps(os.path.join(second, "export")) == 8
    assert retrain.recorded_steps(out) == 8  # --out is the last sitting's export
    assert sorted(os.listdir(out)) == sorted(os.listdir(os.path.join(second, "export")) + [retrain.LOG_FILE])
    with open(os.path.join(out, retrain.LOG_FILE)) as f:
        log = json.load(f)
    assert [r["unet_steps"] for r in log["sittings"]] == [5, 8]
    assert [r["skipped"] for r in log["sittings"]] == [False, False]
    assert all(r["seconds"] > 0 for r in log["sittings"])
    assert log["total_seconds"] == pytest.approx(sum(r["seconds"] for r in log["sittings"]), abs=0.2)
    assert log["devices"] and log["date"]
    err = capsys.readouterr().err
    assert "sitting 1 (from scratch): 5 UNet steps" in err and "sitting 2 (continued): 8 UNet steps" in err

    # a rerun skips the sittings done, keeps their recorded times, and rewrites --out
    calls.clear()
    assert retrain.main(["--workdir", work, "--out", out]) == 0
    assert calls == []
    with open(os.path.join(out, retrain.LOG_FILE)) as f:
        again = json.load(f)
    assert [r["skipped"] for r in again["sittings"]] == [True, True]
    assert [r["seconds"] for r in again["sittings"]] == [r["seconds"] for r in log["sittings"]]

    # a sitting interrupted after its last checkpoint resumes there: no step retrained, only its export
    os.remove(os.path.join(second, "export", base_model.TRAINING_RECORD))
    exported.clear()
    assert retrain.main(["--workdir", work, "--out", out, "--sittings", "2"]) == 0
    assert [c[c.index("--workdir") + 1] for c in calls] == [second]
    assert exported == [8] and retrain.recorded_steps(out) == 8
    assert "unet: resumed at step 3" in capsys.readouterr().err


def test_retrain_refuses_bad_options(capsys):
    for argv, msg in ((["--sittings", "0"], f"--sittings 0 is not in [1, {len(retrain.lineage())}]"),
                      (["--scale", "0"], "--scale 0.0 is not positive")):
        with pytest.raises(SystemExit) as e:
            retrain.main(["--workdir", "unused", "--out", "unused"] + argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(msg)
