#!/usr/bin/env python
"""Run PEFT's own test suite for FourierFT, RandLoRA, AdaLoRA, Bone and MiSS, twice: with the real
PEFT (the baseline) and with deltatune standing in for PEFT's public names (``shim/peft``).

    .venv/bin/python conformance/run.py --method fourierft|randlora|adalora|bone|miss|all [--side peft|deltatune|both]

Not part of ``make test`` (it takes many minutes per method). Offline: it needs the PEFT sdists
(``pip download --no-deps --no-binary :all: peft==0.21.2 peft==0.18.1`` once, into
``conformance/_work/sdist``) and PEFT's extra test dependencies (diffusers, parameterized, attrs,
installed with ``pip install --target conformance/_work/deps --no-deps``). Tests that fail with the
real PEFT too (the Hub is unreachable offline) are not counted against deltatune: the table gives
for each method the tests collected, those the real PEFT passes, and how many of those deltatune
passes. Per-test outcomes go to ``conformance/_work/<method>-<side>.xml`` (JUnit) and the summary
to ``conformance/results.md``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "_work"
SHIM = HERE / "shim"

# Bone exists only up to PEFT 0.18.1 (0.19 replaced it with MiSS); the others are tested on 0.21.2
VERSION = {"fourierft": "0.21.2", "randlora": "0.21.2", "adalora": "0.21.2", "miss": "0.21.2", "bone": "0.18.1"}
# the files where these methods appear in an offline-runnable test
FILES = [
    "test_custom_models.py", "test_config.py", "test_initialization.py", "test_tuners_utils.py",
    "test_low_level_api.py", "test_mixed.py", "test_other.py", "test_randlora.py",
]
# every test in these builds a model from the Hub ("hf-internal-testing/tiny-random-..."): all fail
# offline with the real PEFT too; --hub-files adds them (to see that, or where a cache holds them)
HUB_FILES = [
    "test_decoder_models.py", "test_encoder_decoder_models.py", "test_feature_extraction_models.py",
    "test_seq_classifier.py",
]
TIMEOUT_S = 120  # per test: some PEFT tests wait on the network or a process group offline
# -k expressions: PEFT's test ids name the method (case-insensitive match)
KEYWORD = {"fourierft": "fourierft or FourierFT", "randlora": "randlora", "adalora": "adalora",
           "bone": "bone", "miss": "miss and not missing"}


def sdist_tests(version: str) -> Path:
    tests = WORK / f"peft-{version}" / "tests"
    if tests.is_dir():
        return tests
    archive = WORK / "sdist" / f"peft-{version}.tar.gz"
    if not archive.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"peft=={version}", "-d", str(WORK / "sdist")], check=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"peft-{version}/tests/")
                   or m.name in (f"peft-{version}/pyproject.toml", f"peft-{version}/setup.cfg")]
        tar.extractall(WORK, members=members, filter="data")
    (tests / "__init__.py").touch()  # the sdist drops it; the tests use relative imports
    return tests


def real_peft_path(version: str) -> list[str]:
    """PYTHONPATH entries that make ``import peft`` the real PEFT of that version."""
    if version == "0.18.1":
        return [str(ROOT / ".peft018")]
    return []


def run_side(method: str, side: str, hub_files: bool = False) -> Path:
    version = VERSION[method]
    tests = sdist_tests(version)
    xml = WORK / f"{method}-{side}.xml"
    path = [str(WORK / "deps")]
    if side == "deltatune":
        path = [str(SHIM), str(ROOT / "src"), *real_peft_path(version), *path]
    else:
        path = [*real_peft_path(version), *path]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(path), CUDA_VISIBLE_DEVICES="", PYTHONDONTWRITEBYTECODE="1")
    files = [f"tests/{f}" for f in FILES + (HUB_FILES if hub_files else []) if (tests / f).exists()]
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rN",
           "--continue-on-collection-errors", f"--timeout={TIMEOUT_S}", "-k", KEYWORD[method], f"--junitxml={xml}", *files]
    print(f"[{method}/{side}] PEFT {version}: {' '.join(cmd[3:])}", flush=True)
    log = WORK / f"{method}-{side}.log"
    with open(log, "w") as out:
        subprocess.run(cmd, cwd=tests.parent, env=env, stdout=out, stderr=subprocess.STDOUT)
    return xml


def outcomes(xml: Path) -> dict[str, tuple[str, str]]:
    """{test id: (outcome, first line of the failure message)}."""
    result = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "").strip().splitlines()[0][:200] if node.get("message") else ""
                break
        result[tid] = (outcome, message)
    return result


def cause(message: str) -> str:
    """A short label for a failure message, to group the failing ids."""
    m = re.search(r"cannot import name '(\w+)' from '([\w.]+)'", message)
    if m:
        return f"import of PEFT internal {m.group(2)}.{m.group(1)}"
    m = re.search(r"has no attribute '(\w+)'", message)
    if m:
        return f"attribute not provided: {m.group(1)} ({message.split(':')[0]})"
    return re.sub(r"0x[0-9a-f]+|\d+(\.\d+)?", "N", message)[:220]


# how docs/peft_conformance.md classifies each cause: (a) reads a PEFT internal, (b) a gap in
# deltatune, (c) needs a method deltatune does not have, (d) deliberate or not deltatune's fault
CATEGORIES = [
    ("a", r"uses_shared_state|_all_available_adapter_names|adapter_layer_names|__version__|randlora_A|"
          r"to require grad|Expected \('base_model|Tensor.__contains__"),
    ("c", r"'(LORA|LOHA|LOKR)' is not compatible|Unknown peft_type 'LORA'"),
    ("d", r"KeyError: 'base_model.model.linN.adapters.default.bone_block'|odict_keys|Nlayers\.\.linN|assert N == N|"
          r"^AssertionError$|^assert not True$"),
    ("b", r"."),
]


def category(label: str) -> str:
    return next(c for c, pattern in CATEGORIES if re.search(pattern, label))


def summarise(method: str) -> tuple[list, str]:
    base = outcomes(WORK / f"{method}-peft.xml")
    ours = outcomes(WORK / f"{method}-deltatune.xml")
    counted = [t for t, (o, _) in base.items() if o == "passed"]
    passed = [t for t in counted if ours.get(t, ("missing", ""))[0] == "passed"]
    failing = [t for t in counted if t not in passed]
    groups = collections.defaultdict(list)
    for t in failing:
        outcome, message = ours.get(t, ("missing", "not collected with the shim"))
        groups[cause(message) or outcome].append(t)
    by_category = collections.Counter()
    for label, ids in groups.items():
        by_category[category(label)] += len(ids)
    row = [method, VERSION[method], len(base), sum(o == "passed" for o, _ in base.values()),
           sum(o in ("failed", "error") for o, _ in base.values()), sum(o == "skipped" for o, _ in base.values()),
           len(passed), len(failing), *(by_category[c] for c in "abcd")]
    lines = [f"### {method} (PEFT {VERSION[method]}): {len(failing)} of {len(counted)} counted tests fail\n"]
    for label, ids in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- ({category(label)}) **{label}** ({len(ids)})")
        lines.extend(f"  - `{t}`" for t in ids)
    return row, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="all", choices=[*VERSION, "all"])
    parser.add_argument("--side", default="both", choices=["peft", "deltatune", "both", "none"],
                        help="which runs to (re)do; 'none' only rewrites results.md from the saved XML")
    parser.add_argument("--hub-files", action="store_true", help="also run the suites that need Hub models")
    args = parser.parse_args()
    methods = list(VERSION) if args.method == "all" else [args.method]
    for method in methods:
        for side in ("peft", "deltatune"):
            if args.side in (side, "both"):
                run_side(method, side, args.hub_files)
    rows, details = [], []
    for method in VERSION:
        if (WORK / f"{method}-peft.xml").exists() and (WORK / f"{method}-deltatune.xml").exists():
            row, text = summarise(method)
            rows.append(row)
            details.append(text)
    header = ("| method | PEFT | collected | real PEFT passes (counted) | real PEFT fails (offline) | skipped "
              "| deltatune passes | deltatune fails | (a) PEFT internals | (b) gaps | (c) other methods "
              "| (d) deliberate/other |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    table = "".join("| " + " | ".join(map(str, r)) + " |\n" for r in rows)
    (HERE / "results.md").write_text(
        "# PEFT's own tests against deltatune\n\nWritten by `conformance/run.py` (see docs/peft_conformance.md). "
        "A test counts when the real PEFT passes it offline; 'deltatune fails' is out of those, split by the "
        "categories of docs/peft_conformance.md (a: reads a PEFT internal, b: a gap in deltatune, c: needs a "
        "method deltatune does not implement, d: deliberate difference, PEFT test typo or rounding).\n\n"
        + header + table + "\n## Failing tests, grouped by cause\n\n" + "\n".join(details))
    print(header + table)


if __name__ == "__main__":
    main()
