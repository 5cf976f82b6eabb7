"""A fresh install from the repository root: nothing of ours shadows a package that our dependencies import.

transformers 5 imports Hugging Face's PyPI package `kernels`; our old top-level `kernels/` folder shadowed it from the
repository root and broke every transformers model import. These run in fresh interpreters, from the root, as a user's
`python -c ...` or `python ssd.py` would.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_CLASSES = "from transformers import Qwen3ForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM"


@pytest.mark.parametrize("order", ["transformers first", "ssd first"])
def test_transformers_models_and_ssd_import_together_from_the_root(order):
    imports = [MODEL_CLASSES, "import ssd, ssd_kernels, eval"]
    code = "; ".join(imports if order == "transformers first" else imports[::-1])
    done = subprocess.run([sys.executable, "-c", code + "; print('ok')"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_no_top_level_name_of_ours_is_an_installed_package():
    """Catches the next clash at once: CI installs the latest dependencies, whose top-level modules are listed here."""
    ours = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in ours if name in installed}
    assert not clashes, f"these repository-root modules shadow installed packages: {clashes}"
