"""examples/first_cnn.ipynb runs top to bottom (tiny settings through its environment variables)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "first_cnn.ipynb"


@pytest.fixture
def kernel_on_this_python(tmp_path, monkeypatch):
    """A 'python3' kernelspec that runs this interpreter, found before any user or system one
    (JUPYTER_PATH comes first), so the test needs no `ipykernel install`."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (cifarlab test)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "python3"


def test_notebook_runs(tmp_path, data_dir, monkeypatch, kernel_on_this_python):
    monkeypatch.setenv("CIFARLAB_DATA", str(data_dir))
    for key, value in {"EPOCHS": "1", "STEPS": "20", "TRAIN": "2000", "TEST": "500", "STIMULUS_STEPS": "3",
                       "RUN": str(tmp_path / "run")}.items():
        monkeypatch.setenv(f"CIFARLAB_NOTEBOOK_{key}", value)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name=kernel_on_this_python, timeout=120,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Test accuracy:" in text and "Total params: 1,084,234" in text and "leaky_re_lu_4: 64 stimuli" in text
    pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pngs) >= 10
    assert (tmp_path / "run" / "figures" / "classes.png").exists()
