"""The worked examples in notebooks/ run from top to bottom.

Notebooks without a ``parameters`` cell run as they are. ``own_checkpoint.ipynb`` takes a user's
checkpoint: untouched, it stops at its check with one line saying what to set; with its
parameters cell pointed at a tiny random GPT-2 checkpoint of ours, it runs end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
OWN_CHECKPOINT = Path(__file__).parent.parent / "notebooks" / "own_checkpoint.ipynb"
PROGRESS_WARNINGS = ("IProgress", "TqdmWarning", "TqdmExperimentalWarning", "ipywidgets")
"""What tqdm.auto prints in a kernel without ipywidgets (and in one with them), which fisherjax's
bars must never print."""


def parameters_cell(notebook) -> int | None:
    """The index of the cell tagged ``parameters`` (papermill's convention), or None."""
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    return tagged[0] if tagged else None


STANDALONE = [p for p in NOTEBOOKS if parameters_cell(nbformat.read(p, as_version=4)) is None]


def execute(notebook, cwd: Path):
    """Runs every cell in a fresh python3 kernel whose working directory is ``cwd``; a failing cell
    raises nbclient's CellExecutionError (the cells before it keep their outputs)."""
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def outputs(notebook, kind: str | None = None) -> list:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", []) if kind in (None, o.get("output_type"))]


def stderr(notebook) -> str:
    return "".join(o.get("text", "") for o in outputs(notebook, "stream") if o.get("name") == "stderr")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """``executed(path)``: the notebook at ``path`` run once per module, each in its own directory."""
    cache = {}

    def run(path: Path):
        if path not in cache:
            cache[path] = execute(nbformat.read(path, as_version=4), tmp_path_factory.mktemp(path.stem))
        return cache[path]

    return run


@pytest.mark.slow  # its calls are the README example's (tests/test_readme.py) plus Phase 7's (tests/test_natural.py)
@pytest.mark.parametrize("path", STANDALONE, ids=[p.stem for p in STANDALONE])
def test_notebook_executes(path, executed):
    notebook = executed(path)
    assert not outputs(notebook, "error")
    assert not [w for w in PROGRESS_WARNINGS if w in stderr(notebook)]


@pytest.mark.slow  # reads the run of test_notebook_executes[quickstart]
def test_quickstart_phase5_finds_what_its_text_says(executed):
    notebook = executed(NOTEBOOKS[[p.stem for p in NOTEBOOKS].index("quickstart")])
    phase5 = next(i for i, cell in enumerate(notebook.cells) if cell.source.startswith("## Phase 5"))
    printed = "".join(o.get("text", "") for o in notebook.cells[phase5 + 1].outputs if o.get("output_type") == "stream")
    assert printed.startswith(f"{48 * 48} sample pairs, 0 conflicting")  # "nothing passes the FDR", says the cell after it
    kinds = {k for o in notebook.cells[phase5 + 1].outputs for k in o.get("data", {})}
    assert {"text/markdown", "image/png"} <= kinds  # the table and the figure


def test_own_checkpoint_untouched_says_what_to_set(tmp_path):
    notebook = nbformat.read(OWN_CHECKPOINT, as_version=4)
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        execute(notebook, tmp_path)
    (error,) = outputs(notebook, "error")
    stopped = next(i for i, cell in enumerate(notebook.cells) if error in cell.get("outputs", []))
    assert stopped == parameters_cell(notebook) + 2  # the check right after the parameters
    assert error["ename"] == "ConfigError"
    assert "set the parameters in the first cell" in error["evalue"]
    assert "CHECKPOINT = 'path/to/your/checkpoint' is not a checkpoint directory" in error["evalue"]
    assert "TASKS['a'] = 'a.jsonl' is not a file" in error["evalue"]
    assert "site-packages" not in "".join(error["traceback"]) and "fisherjax/" not in "".join(error["traceback"])  # raised in the cell
    assert not any(cell.get("outputs") for cell in notebook.cells[stopped + 1:] if cell.cell_type == "code")
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow  # one more kernel for the second stop; the default run checks the first (above)
def test_own_checkpoint_a_bad_checkpoint_stops_with_the_librarys_line(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "gpt2", "n_layer": "two"}')
    (tmp_path / "a.txt").write_text("abc\n")
    notebook = nbformat.read(OWN_CHECKPOINT, as_version=4)
    notebook.cells[parameters_cell(notebook)].source = "CHECKPOINT = 'broken'\nTASKS = {'a': 'a.txt'}\nOUT = 'out'\nTOKENIZER = None"
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        execute(notebook, tmp_path)
    (error,) = outputs(notebook, "error")
    assert error["ename"] == "ConfigError" and "config.json" in error["evalue"] and "n_layer" in error["evalue"]
    assert "fisherjax/" not in "".join(error["traceback"])  # the cell's frame only, not the loader's
    assert not (tmp_path / "out").exists()


def test_progress_bars_in_a_kernel_never_warn(tmp_path):
    """In a Jupyter kernel fisherjax's bars are tqdm's widget when ipywidgets imports, else its
    text bar — never tqdm.auto's "IProgress not found" warning, not even for a library's tqdm.auto
    bars imported after fisherjax."""
    code = (
        "import tqdm.notebook, tqdm.std\n"
        "from fisherjax import progressbar\n"
        "import tqdm.auto  # as transformers and huggingface_hub do, after fisherjax\n"
        "assert progressbar.in_notebook_kernel()\n"
        "widgets = progressbar.notebook_widgets_available()\n"
        "assert progressbar.bar_class() is (tqdm.notebook.tqdm if widgets else tqdm.std.tqdm)\n"
        "with progressbar.progress_bar(True, total=3, desc='Fisher[demo]', unit='batch') as bar:\n"
        "    bar.update(3)\n"
        "print('widgets' if widgets else 'text')\n"
    )
    notebook = execute(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]), tmp_path)
    printed = "".join(o.get("text", "") for o in outputs(notebook, "stream") if o.get("name") == "stdout")
    assert not [w for w in PROGRESS_WARNINGS if w in stderr(notebook)]
    if printed.strip() == "text":
        assert "Fisher[demo]" in stderr(notebook)  # the text bar was drawn
    else:
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs(notebook, "display_data"))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A random GPT-2 (2 layers, d=32) with the demo's character tokenizer, and two task files of 8
    lines each: ``add.jsonl`` (prompt + completion) and ``copy.txt`` (one text per line)."""
    torch = pytest.importorskip("torch")
    import transformers

    from fisherjax.demo.tokenizer import save_tokenizer, vocabulary

    root = tmp_path_factory.mktemp("own-checkpoint")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(vocabulary()), n_layer=2, n_embd=32, n_head=4, n_positions=64,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "model")
    save_tokenizer(root / "model")
    rng = np.random.default_rng(0)
    with open(root / "add.jsonl", "w") as f:
        for a, b in rng.integers(0, 99, size=(8, 2)):
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
    (root / "copy.txt").write_text("".join("".join(rng.choice(list("abcdefgh"), size=6)) + "|\n" for _ in range(8)))
    return root


@pytest.mark.slow  # ~20 s: a kernel, the model loaded twice and four phases compiled; the untouched run above is the default check
def test_own_checkpoint_end_to_end(tiny_gpt2, tmp_path):
    notebook = nbformat.read(OWN_CHECKPOINT, as_version=4)
    notebook.cells[parameters_cell(notebook)].source = "\n".join([
        f"CHECKPOINT = {str(tiny_gpt2 / 'model')!r}",
        f"TASKS = {{'add': {str(tiny_gpt2 / 'add.jsonl')!r}, 'copy': {str(tiny_gpt2 / 'copy.txt')!r}}}",
        "OUT = 'run'", "TOKENIZER = None", "PHASES = ('fisher', 'importance', 'masks', 'conflicts')", "MAX_SAMPLES = 6", "BATCH_SIZE = 6",
    ])
    execute(notebook, tmp_path)
    assert not outputs(notebook, "error")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"]["model_type"] == "gpt2" and results["config"]["progress"] is True
    assert {name: f["samples"] for name, f in results["fisher"].items()} == {"add": 6, "copy": 6}
    shown = [o["data"] for o in outputs(notebook, "display_data")]
    markdown = "\n".join(d["text/markdown"] for d in shown if "text/markdown" in d)
    assert "| layers | 2 |" in markdown and "| heads | 4 |" in markdown  # model_info's table
    assert "| add | 6 |" in markdown and "| add vs copy | 36 |" in markdown  # results.json's tables
    assert "## Phase 1" in markdown and "## Phase 5" in markdown  # report.md's sections
    figures = sorted(p.name for p in (tmp_path / "run" / "figures").glob("*.png"))
    assert sum("image/png" in d for d in shown) == len(figures) >= 3  # every figure report.md links, drawn from OUT
    assert "Fisher[add]" in stderr(notebook)  # the progress bars ran (as text: no ipywidgets here) ...
    assert not [w for w in PROGRESS_WARNINGS if w in stderr(notebook)]  # ... without tqdm's warning
