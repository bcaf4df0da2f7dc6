"""Retrains the shipped demo model from scratch in one command: the sittings of its lineage in order.

    python -m cones_jax.demo.retrain --workdir /tmp/demo_retrain --out /tmp/demo_model [--sittings K] [--scale S]

The lineage is `cones_jax/configs/demo_model_lineage.py`: each sitting runs `cones_jax.demo.base_model`
in `WORKDIR/sitting_<k>`, `--init-from` the previous sitting's export (`WORKDIR/sitting_<k-1>/export`),
and exports to `WORKDIR/sitting_<k>/export`; the last sitting's export is then copied to `--out`,
which is replaced whole, with a `retrain_log.json` of each sitting's wall time, the devices and
the date. Resumable: a sitting whose export records the UNet steps it should reach is skipped, and
an interrupted one resumes from its checkpoints. Meant for a GPU: on 2 CPU cores the sittings took
about eight hours (docs/demo_model_training.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

from cones_jax.errors import ConfigError
from cones_jax.fileio import save_json

LOG_FILE = "retrain_log.json"  # in --out
TIME_FILE = "retrain_time.json"  # in a sitting's workdir: its wall time over all attempts
SCALED = ("scenes", "vae_steps", "steps", "stop_at")  # what --scale multiplies


@dataclass(frozen=True)
class Sitting:
    index: int  # 1-based
    name: str
    runs: tuple[dict, ...]  # base_model flags of each invocation in the sitting's workdir
    prior: int  # UNet steps of the weights it starts from
    total: int  # UNet steps of its export

    def reached(self, run: dict) -> int:
        """UNet steps over all sittings once `run` is done."""
        return self.prior + run.get("stop_at", run["steps"])


def lineage() -> tuple[dict, ...]:
    from cones_jax.configs import demo_model_lineage

    return demo_model_lineage.get_config().sittings


def plan(sittings: tuple[dict, ...], scale: float = 1.0) -> list[Sitting]:
    """The sittings with their step and scene counts multiplied by `scale` (at least 1 each), and the
    cumulative UNet steps each starts from and reaches."""
    out, prior = [], 0
    for k, s in enumerate(sittings, 1):
        runs = tuple({key: max(1, round(v * scale)) if key in SCALED else v for key, v in run.items()}
                     for run in s["runs"])
        total = prior + runs[-1].get("stop_at", runs[-1]["steps"])
        out.append(Sitting(k, s["name"], runs, prior, total))
        prior = total
    return out


def flags(run: dict) -> list[str]:
    """`run` as base_model command-line flags."""
    argv = []
    for key, value in run.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    return argv


def recorded_steps(folder: str) -> int | None:
    """The UNet steps an exported folder's record says its weights have had; None without a record."""
    from cones_jax.demo.base_model import TRAINING_RECORD

    path = os.path.join(folder, TRAINING_RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return int(json.load(f)["unet_steps"])


def _log(msg: str) -> None:
    print(f"[retrain {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _read_seconds(workdir: str) -> float:
    path = os.path.join(workdir, TIME_FILE)
    if not os.path.exists(path):
        return 0.0
    with open(path) as f:
        return float(json.load(f)["seconds"])


def sitting_argvs(s: Sitting, workdir: str, init_from: str | None) -> list[list[str]]:
    """The base_model argv of each of the sitting's invocations, exporting to `workdir/export`."""
    start = ["--workdir", workdir, "--out", os.path.join(workdir, "export")]
    return [start + (["--init-from", init_from] if init_from else []) + flags(run) for run in s.runs]


def run_sitting(s: Sitting, workdir: str, init_from: str | None) -> list[list[str]]:
    """Runs (or resumes) one sitting's invocations; returns their argv. Its wall time, over all
    attempts, is added to `workdir/retrain_time.json` even when a run is interrupted."""
    from cones_jax.demo import base_model

    export = os.path.join(workdir, "export")
    argvs = sitting_argvs(s, workdir, init_from)
    for i, (run, argv) in enumerate(zip(s.runs, argvs)):
        done = recorded_steps(export)
        if i < len(s.runs) - 1 and done is not None and done >= s.reached(run):
            continue  # an earlier part of the sitting, exported before an interruption
        _log(f"sitting {s.index} ({s.name}), run {i + 1}/{len(s.runs)}: base_model {' '.join(argv)}")
        t0 = time.time()
        try:
            rc = base_model.main(argv)
        finally:
            os.makedirs(workdir, exist_ok=True)
            save_json(os.path.join(workdir, TIME_FILE), {"seconds": _read_seconds(workdir) + time.time() - t0})
        if rc:
            raise SystemExit(rc)
        if recorded_steps(export) != s.reached(run):
            raise ConfigError(f"{export} records {recorded_steps(export)} UNet steps after sitting {s.index}, "
                              f"not {s.reached(run)}: {workdir} holds checkpoints of another lineage; give a "
                              "fresh --workdir")
    return argvs


def replace_folder(src: str, out: str, extra: dict[str, dict]) -> None:
    """Copies folder `src` to `out` with the JSON files `extra` (name -> object) added: into a temporary
    folder beside `out` first, then renamed onto it, so `out` is never half written (a link to a
    folder has its target replaced)."""
    real = os.path.realpath(out)
    parent = os.path.dirname(real)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(real)}.", suffix=".tmp", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        for name, obj in extra.items():
            save_json(os.path.join(tmp, name), obj)
        if os.path.exists(real):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(real)}.", suffix=".old", dir=parent)
            os.rmdir(old)
            os.rename(real, old)
            os.rename(tmp, real)
            shutil.rmtree(old)
        else:
            os.rename(tmp, real)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def retrain(workdir: str, out: str, *, sittings: int | None = None, scale: float = 1.0,
            chain: tuple[dict, ...] | None = None) -> dict:
    """Runs the first `sittings` sittings of `chain` (default: the shipped model's lineage) and
    writes the last one's export to `out`; returns the log written there."""
    import jax

    steps = plan(chain if chain is not None else lineage(), scale)[:sittings]
    t_start = time.time()
    rows, init_from = [], None
    for s in steps:
        sdir = os.path.join(workdir, f"sitting_{s.index}")
        export = os.path.join(sdir, "export")
        skipped = recorded_steps(export) == s.total
        if skipped:
            _log(f"sitting {s.index} ({s.name}): done, {export} holds {s.total} UNet steps")
            argvs = sitting_argvs(s, sdir, init_from)
        else:
            argvs = run_sitting(s, sdir, init_from)
        seconds = _read_seconds(sdir)
        _log(f"sitting {s.index} ({s.name}): {s.total} UNet steps, {seconds:.0f} s ({seconds / 60:.1f} min)"
             + (" in an earlier run" if skipped else ""))
        rows.append({"sitting": s.index, "name": s.name, "base_model": argvs, "unet_steps": s.total,
                     "seconds": round(seconds, 1), "skipped": skipped})
        init_from = export
    total = sum(r["seconds"] for r in rows)
    devices = jax.devices()
    log = {"command": "python -m cones_jax.demo.retrain", "lineage": "cones_jax/configs/demo_model_lineage.py",
           "scale": scale, "sittings": rows, "total_seconds": round(total, 1),
           "this_run_seconds": round(time.time() - t_start, 1),
           "devices": f"{len(devices)} x {devices[0].platform} ({devices[0].device_kind})",
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    replace_folder(init_from, out, {LOG_FILE: log})
    _log(f"wrote {out}: {rows[-1]['unet_steps']} UNet steps, {len(rows)} sittings in {total:.0f} s "
         f"({total / 3600:.2f} h) on {log['devices']}")
    return log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="one workdir per sitting below it (resumable)")
    p.add_argument("--out", required=True, help="the retrained model's folder (replaced whole at the end)")
    p.add_argument("--sittings", type=int, metavar="K", help="run only the first K sittings (default: all)")
    p.add_argument("--scale", type=float, default=1.0, metavar="S",
                   help="multiply every step count and the scene count by S (at least 1 each): a quick look")
    args = p.parse_args(argv)
    n = len(lineage())
    if args.sittings is not None and not 1 <= args.sittings <= n:
        p.error(f"--sittings {args.sittings} is not in [1, {n}]")
    if not args.scale > 0:
        p.error(f"--scale {args.scale} is not positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cones_jax.cli import run_cli
    from cones_jax.fileio import check_output_dir

    def job() -> None:
        check_output_dir(args.out, "--out")
        retrain(args.workdir, args.out, sittings=args.sittings, scale=args.scale)

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
