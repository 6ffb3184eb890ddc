"""The versions a run was proven with: constraints.txt pins what the suite passed with (install.sh and .ci/run install
it), requirements.txt's ranges admit those pins, and every run reports the installed versions beside the tested ones,
naming in one line each library that differs."""
import logging
import os

from helpers import ROOT
from packaging.requirements import Requirement

import finetune


def test_the_constraints_pin_every_library_a_run_reports_within_the_requirements_ranges():
    tested = finetune.tested_versions(os.path.join(ROOT, "constraints.txt"))
    assert set(finetune.RUN_LIBRARIES) <= set(tested)
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        requirements = [Requirement(line.split("#")[0].strip()) for line in f if line.split("#")[0].strip()]
    for requirement in requirements:
        name = requirement.name.lower().replace("_", "-")
        assert name in tested, f"{name}: in requirements.txt but not pinned in constraints.txt"
        assert requirement.specifier.contains(tested[name]), f"{name} {tested[name]} is outside {requirement}"


def test_every_run_reports_its_versions_and_names_those_it_was_not_tested_with(monkeypatch, tmp_path, caplog):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("# pins\ntorch==2.13.0\ntransformers==5.25.0  # a comment\npeft==0.21.2\n")
    monkeypatch.setattr(finetune, "CONSTRAINTS", str(constraints))
    monkeypatch.setattr(finetune, "installed_versions", lambda: {"torch": "2.13.0+cu128", "transformers": "5.25.0",
                                                                 "peft": "0.22.0", "datasets": "5.2.0"})
    with caplog.at_level(logging.INFO, logger="finetune"):
        finetune.report_versions()
    assert ("libraries, installed (tested): torch 2.13.0+cu128 (2.13.0), transformers 5.25.0 (5.25.0), peft 0.22.0 "
            "(0.21.2), datasets 5.2.0 (not tested)") in caplog.text
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"peft 0.22.0, datasets 5.2.0: not the versions the test suite passed with (0.21.2, none, "
                        f"{constraints}); the run may still be right, but nothing has shown it"]
    caplog.clear()
    monkeypatch.setattr(finetune, "installed_versions", lambda: {"torch": "2.13.0", "peft": "0.21.2"})
    with caplog.at_level(logging.INFO, logger="finetune"):
        finetune.report_versions()
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # the build tag of torch does not count
