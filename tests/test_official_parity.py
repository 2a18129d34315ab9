"""benchmark/official_parity.py run as a user would: against the official DrM code when
DRM_OFFICIAL_CHECKOUT names a checkout of XuGW-Kevin/DrM at 317116a (skipped otherwise), and its
one-line refusals of an --official path that is not such a checkout."""

import os
import re
import sys

import pytest

from helpers import ROOT, run_script

OFFICIAL = os.environ.get("DRM_OFFICIAL_CHECKOUT")
NEEDS_OFFICIAL = pytest.mark.skipif(not OFFICIAL, reason="set DRM_OFFICIAL_CHECKOUT to a checkout of XuGW-Kevin/DrM at commit 317116a")
FAMILIES = ("dmc", "adroit", "metaworld")
CHECKS = [
    ("shift", "frames"), ("forward", "outputs"), ("update", "parameters"), ("update", "metrics"),
    ("perturb+update", "parameters"), ("perturb+update", "metrics"),
]  # fmt: skip
TOLERANCE = 1e-5  # the script's default --tolerance
ROW = re.compile(r"^(\S+) +(\S+) +(\S+) +(\d\.\de[+-]\d\d)  (.+)$", re.MULTILINE)


def run_parity(tmp_path, *flags):
    # one thread: the check is small, and two OpenMP threads on a busy 2-core machine run it 7x slower
    return run_script("benchmark/official_parity.py", *flags, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})


@NEEDS_OFFICIAL
def test_every_family_matches_the_official_code(tmp_path):
    result = run_parity(tmp_path, "--official", OFFICIAL)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = ROW.findall(result.stdout)
    assert [(family, check, compared) for family, check, compared, _, _ in rows] == [
        (family, check, compared) for family in FAMILIES for check, compared in CHECKS
    ]
    for family, check, compared, difference, where in rows:
        assert float(difference) < TOLERANCE, (family, check, compared, difference, where)
    assert "torch " in result.stdout and "Adam eps 0.0001, shared shifts" in result.stdout


@NEEDS_OFFICIAL
def test_a_difference_above_the_tolerance_stops_with_one_line(tmp_path):
    # float rounding alone (the target critic's Polyak average) differs by about 1e-7
    result = run_parity(tmp_path, "--official", OFFICIAL, "--families", "dmc", "--tolerance", "1e-12")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("official_parity.py: dmc update parameters differ by ")
    assert result.stderr.rstrip().endswith("(above --tolerance 1e-12)")
    assert len(ROW.findall(result.stdout)) == len(CHECKS)  # the table is printed whole first


def test_a_wrong_official_path_stops_with_one_line_naming_the_flag(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_parity(tmp_path, "--official", str(missing), "--families", "dmc")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"official_parity.py: --official {missing}: no such directory\n"

    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    import official_parity

    not_a_checkout = tmp_path / "empty"
    not_a_checkout.mkdir()
    broken = tmp_path / "broken"
    (broken / "agents").mkdir(parents=True)
    (broken / "agents" / "drm.py").write_text("import a_module_that_does_not_exist\n")
    (broken / "utils.py").write_text("")
    expected = {
        not_a_checkout: f"official_parity.py: --official {not_a_checkout} is not a checkout of XuGW-Kevin/DrM (no agents/drm.py)",
        broken: (
            f"official_parity.py: --official {broken}: importing the official agents failed "
            "(ModuleNotFoundError: No module named 'a_module_that_does_not_exist')"
        ),
    }
    for path, message in expected.items():
        with pytest.raises(SystemExit) as stop:
            official_parity.import_official(str(path), ["dmc"])
        assert str(stop.value) == message
