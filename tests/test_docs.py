"""The README and docs against the code: the tests they name exist, the commands' --help says what each flag
does, the examples name files that exist, shell examples expand as written."""
import re
from pathlib import Path

import pytest
from conftest import load_script

import main as entry

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_test_the_readme_names_exists():
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`(?:tests/)?(test_\w+\.py)::(test_\w+)`", readme))
    assert len(named) > 20  # the peers' table names a test on every row
    for filename, test in sorted(named):
        source = (ROOT / "tests" / filename).read_text()
        assert re.search(rf"^def {test}\(", source, re.M), f"README names {filename}::{test}, which does not exist"
    for filename in set(re.findall(r"`tests/(test_\w+\.py)`", readme)):
        assert (ROOT / "tests" / filename).is_file(), filename


def test_every_main_flag_has_help():
    undocumented = [action.option_strings for action in entry.get_parser()._actions
                    if action.option_strings and not action.help]
    assert not undocumented


def script_help(name, capsys):
    with pytest.raises(SystemExit):
        load_script(name).main(["--help"])
    return " ".join(capsys.readouterr().out.split())


def test_evaluate_model_help_example_names_files_that_exist(capsys):
    out = script_help("evaluate_model", capsys)
    paths = re.findall(r"(?:configs|models|data)/[\w./-]+", out)
    assert {"configs/toy/txt2img-shapes-inference.yaml", "models/toy/shapes-ldm.safetensors",
            "data/toy_concept"} <= set(paths)
    for path in paths:
        assert (ROOT / path).exists(), f"evaluate_model.py --help names {path}, which does not exist"


def test_stable_txt2img_help_names_every_family(capsys):
    out = script_help("stable_txt2img", capsys)
    assert "SD v1 by default (512 px); SD 2.x and SDXL with their --config" in out and "--negative_prompt" in out


def test_shell_variables_in_examples_expand_as_meant():
    """`$SAMPLER_$STEPS` is the (empty) variable SAMPLER_ followed by STEPS: write ${SAMPLER}_$STEPS."""
    for doc in DOCS:
        bad = re.findall(r"\$[A-Z][A-Z0-9]*_(?=[$A-Za-z0-9])", doc.read_text())
        assert not bad, f"{doc.name}: {bad}"
