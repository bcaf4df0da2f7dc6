"""Training: register a subject as a Cones 2 residual token embedding or as Cones concept neurons;
the command line of `train.py`, `python -m cones_jax.train` and `cones-jax-train`.

    python train.py residual --model /models/sd21 --images photos/dog --word dog --out dog.safetensors
    python train.py residual --word dog --out dog.safetensors --import-official residual.pt --allow-pickle
    python train.py residual --model /models/sd21 --subjects subjects.json --out-dir residuals/ \
        [--skip-bad-subjects] [--checkpoint-dir ckpt --resume] [--distributed [--coordinator H:P ...]]
    python train.py neurons --model /models/sd15 --images photos/dog --class dog --out dog.cones
    python train.py neurons --model /models/sd15 --subjects subjects.json --out-dir neurons/
    python train.py neurons-joint --model /models/sd15 --neurons dog.cones cat.cones \
        --images photos/dog photos/cat --out dog_cat.cones
    python train.py neurons ... --keep-scores        # also dog.scores.safetensors, the scores M_p
    python train.py neurons-cut --scores dog.scores.safetensors --sparsity 2e-3 --out dog_2e-3.cones

Config values: the preset (or `--config NAME|FILE.py`) < flags. With neither --preset nor --config,
the model's own training defaults apply (the demo model's recipe, else its native resolution; see
docs/resume.md) and one stderr line names them. `--set key=value` overrides any key
of the config (type-checked); `--steps`, `--lr`, ... are the same as `--set steps=...`, and win over
a `--set` of the same key.

Many subjects in one run (`residual|neurons --subjects FILE|FOLDER --out-dir DIR`; for `neurons`
a subject's word is its class word): the model loads once and
one jitted step trains every subject side by side over a (subject, data, model) mesh of all devices
of all processes (`--distributed`); each subject's Δ is what its own run would give, written as
DIR/<name>.safetensors. FILE is JSON, `{"subjects": [{"images": DIR, "word": W, "name": N,
"overrides": {"seed": 3}}]}`; a FOLDER holds one folder per subject named `word` or `word-anything`.
A subject's overrides (any config key) win over the run's flags; subjects whose configs differ in
more than `seed` train in groups, one after another (with --checkpoint-dir, each group in its own
DIR/group-<hash> when the file makes several). Subjects whose file exists are skipped (--overwrite
retrains them); every other subject is checked before the model loads, and a bad one refuses the
run (one line each) unless --skip-bad-subjects. `--set model_parallel=M` shards the frozen UNet
over M devices instead of copying it to each.

Exit codes: 0 done; 2 bad input (one line on stderr, nothing written); 1 the environment or a
diverged loss; 130 / 143 stopped by Ctrl-C / SIGTERM (the line says where to resume; docs/resume.md).
"""

from __future__ import annotations

import argparse
import sys


def _residual_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("residual", help="Cones 2: fine-tune the text encoder on a subject and keep Δ",
                       description="Cones 2 residual token embedding (Sec. 3.2, Eqs. 2-5).")
    p.add_argument("--model", help="local Stable Diffusion folder in diffusers layout (default: the bundled demo "
                                   "or $CONES_JAX_MODEL)")
    p.add_argument("--images", help="folder of subject photos (3-5)")
    p.add_argument("--word", help="the subject's category word, e.g. dog")
    p.add_argument("--out", help="residual file to write (.safetensors)")
    _subjects_flags(p, ".safetensors")
    p.add_argument("--preset", choices=["official", "paper"],
                   help="default: the model's own training defaults (cones2_train_demo for the demo model; "
                        "else official at the model's native resolution)")
    p.add_argument("--config", help="a training config instead of the preset's: a preset name of cones_jax/configs "
                                    "(e.g. cones2_train_demo) or a .py file with get_config()")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--resolution", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-dir", help="orbax checkpoints of the trained encoder + optimiser state")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="frozen UNet/VAE params and compute (the trained encoder stays fp32)")
    p.add_argument("--remat", action="store_true",
                   help="rematerialise text-encoder and UNet layers in the backward pass (less memory)")
    p.add_argument("--sentences", help="paper preset: file of preservation sentences, one per line")
    _distributed_flags(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output file; with --subjects, retrain subjects whose file exists")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="print the traceback of any failure")
    p.add_argument("--import-official", metavar="PT", help="convert an official Cones-V2 residual.pt instead")
    p.add_argument("--allow-pickle", action="store_true", help="allow unpickling --import-official (trusted files)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, type-checked (repeatable)")


def _subjects_flags(p: argparse.ArgumentParser, suffix: str) -> None:
    """Many subjects in one run: the flags `residual` and `neurons` share."""
    p.add_argument("--subjects", help="many subjects in one run, instead of --images and the word and --out: a JSON "
                                      'file ({"subjects": [{"images": DIR, "word": W, "name": N, "overrides": '
                                      "{...}}]}) or a folder of subject folders named `word` or `word-anything`")
    p.add_argument("--out-dir", help=f"with --subjects: the folder of the output files, one <name>{suffix} each")
    p.add_argument("--skip-bad-subjects", action="store_true",
                   help="with --subjects: train the good subjects when some are bad (default: refuse the run)")


def _distributed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize(); the mesh spans every process's devices")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="with --distributed: process 0's address "
                                                              "(default $JAX_COORDINATOR_ADDRESS; none on TPU VMs)")
    p.add_argument("--num-processes", type=int, help="with --distributed (default $JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="with --distributed (default $JAX_PROCESS_ID)")


def _initialize_distributed(args: argparse.Namespace) -> None:
    from cones_jax.training import maybe_initialize_distributed

    maybe_initialize_distributed(args.distributed, args.coordinator, args.num_processes, args.process_id)


def _check_mode(args: argparse.Namespace, one_only: dict[str, str], required: dict[str, str], error: type) -> None:
    """One subject (--images, the word, --out) or many (--subjects, --out-dir), never a mix."""
    if args.subjects:
        mixed = [flag for key, flag in one_only.items() if getattr(args, key)]
        if mixed:
            raise error(f"--subjects trains the subjects its file lists; drop {', '.join(mixed)} "
                        "(give each subject's photos and word in the subjects file)")
        if not args.out_dir:
            raise error("--subjects needs --out-dir, the folder of the output files")
        return
    mixed = [flag for key, flag in _MANY_ONLY.items() if getattr(args, key)]
    if mixed:
        raise error(f"{', '.join(mixed)} go(es) with --subjects; for one subject give --out FILE")
    for key, flag in required.items():
        if not getattr(args, key):
            raise error(f"{flag} is required (or --subjects FILE --out-dir DIR for many subjects)")


def _run_flags(p: argparse.ArgumentParser) -> None:
    """The flags every concept-neuron command shares: precision, outputs, output noise, --set."""
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="print the traceback of any failure")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, type-checked (repeatable)")


def _neurons_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("neurons", help="Cones: find the concept neurons of a subject (a sparse index set)",
                       description="Cones concept neurons (Sec. 3, Algorithm A2).")
    p.add_argument("--model", help="local Stable Diffusion folder in diffusers layout (default: the bundled demo "
                                   "or $CONES_JAX_MODEL)")
    p.add_argument("--images", help="folder of subject photos")
    p.add_argument("--class", dest="class_word", help="the subject's class word, e.g. dog")
    p.add_argument("--out", help="concept-neuron file to write (.cones)")
    _subjects_flags(p, ".cones")
    p.add_argument("--identifier", help="rare token V* of the prompt 'photo of a V* dog' (default: sks)")
    p.add_argument("--config", help="a preset name of cones_jax/configs (default cones1_train; "
                                    "cones1_train_demo for the demo model) or a .py file with get_config()")
    p.add_argument("--steps", type=int, help="K, steps of gradient descent on ξ")
    p.add_argument("--rho", type=float, help="learning rate ρ of that descent")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--tau", type=float, help="shut the weights with M_p = (1 - ξ)/ρ > τ")
    sel.add_argument("--sparsity", type=float, help="or shut this fraction of the searched weights")
    p.add_argument("--batch", type=int)
    p.add_argument("--class-images", help="folder of class images, filled up by the base model if short "
                                          "(with --subjects: a folder of one such folder per class word; default: "
                                          "a per-user cache keyed by the base model, $CONES_JAX_CACHE)")
    p.add_argument("--checkpoint-dir", help="orbax checkpoints of ξ + step + RNG")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--keep-scores", action="store_true",
                   help="also write the scores M_p beside each .cones file (NAME.scores.safetensors), to cut at "
                        "another τ or sparsity with train.py neurons-cut, without searching again")
    _distributed_flags(p)
    _run_flags(p)


def _cut_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("neurons-cut", help="Cones: concept neurons from kept scores at another τ or sparsity",
                       description="Write .cones files from the scores that train.py neurons --keep-scores kept: "
                                   "the weights with M_p > τ (Alg. A2), with no search and no model.")
    p.add_argument("--scores", nargs="+", required=True, help="NAME.scores.safetensors file(s)")
    sel = p.add_mutually_exclusive_group(required=True)
    sel.add_argument("--tau", type=float, help="shut the weights with M_p > τ")
    sel.add_argument("--sparsity", type=float, help="or shut this fraction of the scored weights")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="the .cones file to write (one scores file)")
    out.add_argument("--out-dir", help="a folder for DIR/NAME.cones, one per scores file")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--debug", action="store_true", help="print the traceback of any failure")


def _joint_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("neurons-joint", help="Cones Sec. 3.3: fine-tune the union of several subjects' neurons",
                       description="Re-run the concept-neuron search with the summed loss of all subjects, "
                                   "restricted to the union of their neurons (Cones, Sec. 3.3).")
    p.add_argument("--model", help="local Stable Diffusion folder in diffusers layout (default: the bundled demo "
                                   "or $CONES_JAX_MODEL)")
    p.add_argument("--neurons", nargs="+", required=True, help="the subjects' .cones files (from train.py neurons)")
    p.add_argument("--images", nargs="+", required=True, help="each subject's photo folder, in the same order")
    p.add_argument("--class-images", nargs="+", help="each subject's class-image folder, in the same order")
    p.add_argument("--out", required=True, help="concept-neuron file to write (.cones), holding all subjects")
    p.add_argument("--config", help="a preset name of cones_jax/configs (default cones1_train; "
                                    "cones1_train_demo for the demo model) or a .py file with get_config()")
    p.add_argument("--steps", type=int, help="steps of gradient descent on ξ")
    p.add_argument("--rho", type=float)
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--tau", type=float, help="keep the union's neurons with joint M_p > τ (default: joint_tau)")
    sel.add_argument("--keep", type=float, help="or keep this fraction of the union, by joint score")
    p.add_argument("--batch", type=int)
    _distributed_flags(p)
    _run_flags(p)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    _residual_parser(sub)
    _neurons_parser(sub)
    _cut_parser(sub)
    _joint_parser(sub)
    return p


_MANY_ONLY = {"out_dir": "--out-dir", "skip_bad_subjects": "--skip-bad-subjects"}
_ONE_ONLY = {"images": "--images", "word": "--word", "out": "--out", "sentences": "--sentences",
             "import_official": "--import-official"}


def run_residual(args: argparse.Namespace) -> None:
    from cones_jax.config import parse_overrides
    from cones_jax.generate import default_model
    from cones_jax.residual import ResidualError, import_official, train_residual

    _check_mode(args, _ONE_ONLY, {"word": "--word", "out": "--out"}, ResidualError)
    _initialize_distributed(args)
    if args.subjects:
        run_residuals(args, args.model or default_model(), parse_overrides(args.set))
        return
    model = args.model or default_model()
    if args.import_official:
        res = import_official(args.import_official, args.word, args.out, model_dir=model,
                              allow_pickle=args.allow_pickle, overwrite=args.overwrite)
        print(f"wrote {args.out} ({res.delta.shape[0]} × {res.dim}, imported)")
        return
    if not args.images:
        raise ResidualError("--images is required (a folder of subject photos)")
    train_residual(model, args.images, args.word, args.out, preset=args.preset, config=args.config,
                   steps=args.steps, batch=args.batch, lr=args.lr, resolution=args.resolution, seed=args.seed,
                   checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
                   dtype=args.dtype, remat=args.remat, sentences=args.sentences, overwrite=args.overwrite,
                   progress=not args.no_progress, overrides=parse_overrides(args.set))


def run_residuals(args: argparse.Namespace, model: str, overrides: dict) -> None:
    """`train.py residual --subjects`: every subject of the file in one run (`train_residuals`)."""
    from cones_jax.residual import ManyOptions, train_residuals

    flags = dict(steps=args.steps, batch=args.batch, lr=args.lr, resolution=args.resolution, seed=args.seed,
                 checkpoint_every=args.checkpoint_every)
    options = ManyOptions(preset=args.preset, config=args.config,
                          overrides={**overrides, **{k: v for k, v in flags.items() if v is not None}},
                          checkpoint_dir=args.checkpoint_dir, resume=args.resume, dtype=args.dtype, remat=args.remat,
                          overwrite=args.overwrite, skip_bad=args.skip_bad_subjects, progress=not args.no_progress)
    train_residuals(model, args.subjects, args.out_dir, options)


def run_neurons(args: argparse.Namespace) -> None:
    from cones_jax.config import parse_overrides
    from cones_jax.generate import default_model
    from cones_jax.neurons import NeuronsError, SearchOptions, train_neurons, train_neurons_many

    _check_mode(args, {"images": "--images", "class_word": "--class", "out": "--out"},
                {"images": "--images", "class_word": "--class", "out": "--out"}, NeuronsError)
    _initialize_distributed(args)
    flags = {"steps": args.steps, "rho": args.rho, "batch": args.batch, "identifier": args.identifier,
             "checkpoint_every": args.checkpoint_every}
    overrides = {**parse_overrides(args.set), **{k: v for k, v in flags.items() if v is not None}}
    options = SearchOptions(config=args.config, overrides=overrides, tau=args.tau, sparsity=args.sparsity,
                            class_dir=args.class_images, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                            dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress,
                            keep_scores=args.keep_scores)
    model = args.model or default_model()
    if args.subjects:
        from cones_jax.subjects import read_subjects

        train_neurons_many(model, read_subjects(args.subjects), args.out_dir, options, skip_bad=args.skip_bad_subjects)
        return
    train_neurons(model, args.images, args.class_word, args.out, options)


def run_cut(args: argparse.Namespace) -> None:
    from cones_jax.neurons import cut_scores

    cut_scores(args.scores, out=args.out, out_dir=args.out_dir, tau=args.tau, sparsity=args.sparsity,
               overwrite=args.overwrite)


def run_joint(args: argparse.Namespace) -> None:
    from cones_jax.config import parse_overrides
    from cones_jax.generate import default_model
    from cones_jax.neurons import JointOptions, finetune_union

    flags = {"steps": args.steps, "rho": args.rho, "batch": args.batch}
    overrides = {**parse_overrides(args.set), **{k: v for k, v in flags.items() if v is not None}}
    _initialize_distributed(args)
    options = JointOptions(config=args.config, overrides=overrides, tau=args.tau, keep=args.keep,
                           class_dirs=tuple(args.class_images or ()), dtype=args.dtype, overwrite=args.overwrite,
                           progress=not args.no_progress)
    finetune_union(args.model or default_model(), args.neurons, args.images, args.out, options)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cones_jax.cli import run_cli

    commands = {"residual": run_residual, "neurons": run_neurons, "neurons-cut": run_cut, "neurons-joint": run_joint}
    return run_cli(lambda: commands[args.command](args), debug=args.debug, parser=build_parser(),
                   flags={"class_word": "--class", "class_dir": "--class-images"})


if __name__ == "__main__":
    sys.exit(main())
