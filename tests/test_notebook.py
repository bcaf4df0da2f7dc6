"""notebooks/quickstart.ipynb runs top to bottom on the bundled demo model (as a user runs it)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # One CPU device, as on a laptop (the test session's 8 fake devices are for the sharding tests).
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("QUICKSTART_STEPS", "60")
    monkeypatch.setenv("QUICKSTART_SKIP_APP", "1")  # the app cell serves until the kernel stops
    monkeypatch.delenv("SD_MODEL_DIR", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "residual: (1, 96)" in text, text
    assert "SD_MODEL_DIR is not set" in text
    assert "the app cell is skipped here" in text
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {}))
    assert images >= 8, images
