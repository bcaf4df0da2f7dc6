"""One error family: a `ConesError` is one line and its exit code; anything else is a bug."""

import errno
import inspect

import pytest

from cones_jax import cli, errors
from cones_jax import sample as sample_cli


def _error_classes():
    return [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]


def test_every_error_is_a_cones_error_and_input_errors_stay_value_errors():
    classes = _error_classes()
    assert len(classes) >= 10
    for cls in classes:
        assert issubclass(cls, errors.ConesError), cls
        if cls.exit_code == 2 and cls is not errors.ConesError:
            assert issubclass(cls, ValueError), cls
    assert errors.DivergedError.exit_code == 1 and issubclass(errors.DivergedError, FloatingPointError)


def test_the_modules_raise_the_family():
    from cones_jax import artifacts, fileio, layout, residual, sampler, training

    assert layout.LayoutError is errors.LayoutError
    assert fileio.CheckpointError is errors.CheckpointError
    assert artifacts.ArtifactError is errors.ArtifactError
    assert training.DataError is errors.DataError
    assert sampler.GenerateError is errors.GenerateError
    assert residual.ResidualError is errors.ResidualError


@pytest.mark.parametrize("exc, code", [(errors.LayoutError("subjects[0].box: x1 must be > x0\n(got 0.6, 0.2)"), 2),
                                       (errors.DivergedError("loss became nan at step 3; lower the learning rate"), 1),
                                       (OSError(errno.ENOSPC, "No space left on device", "/out/a.png"), 1)])
def test_run_cli_prints_one_line_and_the_exit_code(exc, code, capsys):
    def job():
        raise exc

    assert cli.run_cli(job) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    if isinstance(exc, OSError):
        assert "No space left on device (/out/a.png)" in err


def test_a_bug_keeps_its_traceback_and_exits_1(capsys):
    def job():
        raise ValueError("an internal invariant broke")  # not a ConesError: a bug, not bad input

    assert cli.run_cli(job) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "an internal invariant broke" in err and "please report it" in err


def test_debug_shows_the_traceback_of_an_input_error(tmp_path, capsys):
    missing = str(tmp_path / "no_such_layout.json")
    assert sample_cli.main(["--layout", missing, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert sample_cli.main(["--layout", missing, "--out", str(tmp_path / "out"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_library_messages_name_parameters_and_the_cli_names_flags():
    from cones_jax import train as train_cli

    flags = cli.flag_names(train_cli.build_parser(), {"class_word": "--class"})
    assert flags["checkpoint_dir"] == "--checkpoint-dir" and flags["class_images"] == "--class-images"
    message = "`resume` needs `checkpoint_dir` (where the checkpoints are); `unknown_name` keeps its quotes"
    assert cli.as_flags(message, flags) == ("--resume needs --checkpoint-dir (where the checkpoints are); "
                                            "`unknown_name` keeps its quotes")
    sample_flags = cli.flag_names(sample_cli.build_parser(), {"out_dir": "--out"})
    assert cli.as_flags("choose another `out_dir`; `seeds`", sample_flags) == "choose another --out; --seeds"


def test_a_library_error_reaches_the_command_line_as_its_flag(tmp_path, capsys):
    from cones_jax import train as train_cli

    photos = tmp_path / "photos"
    photos.mkdir()
    rc = train_cli.main(["residual", "--images", str(photos), "--word", "dog", "--out", str(tmp_path / "dog.txt")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--out" in err and "`out`" not in err, err
