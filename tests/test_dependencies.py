"""The package's imports match what it declares: no PyTorch stack inside cones_jax/, every third-party
import required (or an optional extra behind an ImportError guard), and benchmarks run one way."""

import ast
import configparser
import importlib.metadata as md
import os
import re
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "cones_jax")


def python_files(folder: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".py"))


def _catches_import_error(node: ast.Try) -> bool:
    names = set()
    for handler in node.handlers:
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names |= {t.id for t in types if isinstance(t, ast.Name)}
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def imports(path: str) -> list[tuple[str, bool]]:
    """(top-level module name, guarded) of every absolute import in a file, at any depth; guarded
    means inside the body of a `try` that catches ImportError (an optional dependency)."""
    found = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((a.name.split(".")[0], guarded) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], guarded))
        if isinstance(node, ast.Try) and _catches_import_error(node):
            for child in node.body:
                visit(child, True)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, guarded)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    with open(path, encoding="utf-8") as f:
        visit(ast.parse(f.read(), path), False)
    return found


def requirement_names(text: str) -> set[str]:
    return {normalize(re.split(r"[\s<>=!~\[;(]", line.strip(), maxsplit=1)[0])
            for line in text.splitlines() if line.strip() and not line.strip().startswith("#")}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> tuple[set[str], set[str]]:
    """(install_requires, union of the extras) from setup.cfg, normalized distribution names."""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    required = requirement_names(cfg.get("options", "install_requires"))
    extras = set()
    if cfg.has_section("options.extras_require"):
        for _, text in cfg.items("options.extras_require"):
            extras |= requirement_names(text)
    return required, extras


def test_package_never_imports_torch_or_diffusers():
    offenders = [(os.path.relpath(p, ROOT), m) for p in python_files(PACKAGE) for m, _ in imports(p)
                 if m in ("torch", "diffusers", "transformers")]
    assert not offenders, f"the PyTorch stack belongs in benchmarks/ and tests/, not in the package: {offenders}"


def test_every_third_party_import_is_declared():
    required, extras = declared()
    dists_of = md.packages_distributions()
    missing = []
    for path in python_files(PACKAGE):
        for module, guarded in imports(path):
            if module in sys.stdlib_module_names or module == "cones_jax" or module == "__future__":
                continue
            dists = {normalize(d) for d in dists_of.get(module, [module])}
            ok = dists & (required | extras) if guarded else dists & required
            if not ok:
                missing.append((os.path.relpath(path, ROOT), module, sorted(dists), "optional" if guarded else ""))
    assert not missing, f"imported but not declared in setup.cfg: {missing}"


def test_no_unused_runtime_requirement():
    # a requirement nothing in the package imports is weight for every user (the test extra holds oracles)
    required, _ = declared()
    dists_of = md.packages_distributions()
    used = {normalize(d) for p in python_files(PACKAGE) for m, _ in imports(p) for d in dists_of.get(m, [m])}
    assert required <= used, f"declared but never imported under cones_jax/: {sorted(required - used)}"


def test_benchmarks_run_as_modules_without_path_edits():
    for path in python_files(os.path.join(ROOT, "benchmarks")):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert "sys.path" not in text, f"{path}: benchmarks run as `python -m benchmarks.<name>` from the root"
        assert not re.search(r"python benchmarks/", text), f"{path}: name the command as `python -m benchmarks.x`"
    for doc in ("README.md", "BENCHMARKS.md"):
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            text = f.read()
        assert "cones_jax.bench" not in text and "python benchmarks/" not in text, doc


def test_our_safetensors_files_are_the_reference_format(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    import ml_dtypes

    from cones_jax.fileio import load_safetensors, save_safetensors

    rng = np.random.default_rng(0)
    tensors = {"f32": rng.standard_normal((3, 5)).astype(np.float32), "i64": np.arange(7, dtype=np.int64),
               "bf16": rng.standard_normal((2, 4)).astype(ml_dtypes.bfloat16), "empty": np.zeros((0, 3), np.float16),
               "flag": np.array([True, False])}
    ours = str(tmp_path / "ours.safetensors")
    save_safetensors(ours, tensors, {"format": "test"})
    theirs = st.load_file(ours)
    assert set(theirs) == set(tensors)
    for name, value in tensors.items():
        assert theirs[name].dtype == value.dtype and np.array_equal(theirs[name], value), name

    ref = str(tmp_path / "reference.safetensors")
    st.save_file(tensors, ref, metadata={"format": "test"})
    back, meta = load_safetensors(ref)
    assert meta == {"format": "test"}
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name


def test_torch_save_files_read_without_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from cones_jax.fileio import CheckpointError, read_torch_tensor

    cases = {"ones": torch.ones(1, 32), "strided": torch.arange(12.0).reshape(3, 4).t()[1:],
             "int": torch.arange(5), "bf16": torch.randn(3, 4).to(torch.bfloat16), "half": torch.randn(2, 2).half()}
    for name, tensor in cases.items():
        path = str(tmp_path / f"{name}.pt")
        torch.save(tensor, path)
        got = read_torch_tensor(path)
        assert got.shape == tuple(tensor.shape) and str(got.dtype) == str(tensor.dtype).replace("torch.", ""), name
        np.testing.assert_array_equal(got.astype(np.float32), tensor.float().numpy())

    # anything beyond a bare tensor is refused by name, and its code never runs
    torch.save({"residual": torch.ones(2), "fn": os.system}, str(tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match="posix.system|os.system|only a bare tensor"):
        read_torch_tensor(str(tmp_path / "other.pt"))
