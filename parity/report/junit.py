"""JUnit XML: one test case per prompt and gate, so CI systems show parity gates as tests.

- a prompt that ran: one case per evaluated gate (a failure when the gate failed); a prompt that
  ran with every gate switched off gets one passing ``run`` case, so it still shows up;
- a prompt that did not run (the engine crashed first): one skipped ``run`` case;
- an engine failure: one extra ``engine`` case with an error.

Counts (tests, failures, errors, skipped) are set on the suite and on the root, where some CI
readers look. Text from the run is stripped of characters XML 1.0 cannot carry.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from parity.results import Gate, Summary

_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _clean(text: object) -> str:
    return _INVALID_XML.sub("?", str(text))


def _seconds(timing: dict | None, n_cases: int) -> str:
    """The prompt's engine time, shared evenly by its cases (so suite totals stay right)."""
    total = sum(v for v in (timing or {}).values() if isinstance(v, (int, float)) and not isinstance(v, bool))
    return f"{total / max(n_cases, 1):.3f}"


def build(summary: Summary) -> ET.Element:
    """The <testsuites> tree for a run summary."""
    suites = ET.Element("testsuites", name="parity")
    suite = ET.SubElement(suites, "testsuite", name=_clean(f"parity.{summary.recipe.get('name', 'run')}"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for prompt in summary.prompts:
        classname = _clean(f"parity.{prompt.id}")
        if not prompt.ran:
            case = ET.SubElement(suite, "testcase", classname=classname, name="run", time="0")
            reason = prompt.extra.get("reason")
            message = _clean(f"prompt not run ({prompt.status}" + (f": {reason})" if reason else ")"))
            if prompt.status == "failed":  # it started and its worker or engine failed: an error, not a skip
                ET.SubElement(case, "error", message=message, type="parity.engine")
                counts["errors"] += 1
            else:
                ET.SubElement(case, "skipped", message=message)
                counts["skipped"] += 1
            counts["tests"] += 1
            continue
        first = prompt.comparison.first_divergence if prompt.comparison else None
        context = f"first divergence: {first.where() if first else 'none'}"
        gates = prompt.gates or [Gate("run", True, "no gate evaluated")]
        per_case = _seconds(prompt.timing, len(gates))
        for gate in gates:
            case = ET.SubElement(suite, "testcase", classname=classname, name=_clean(gate.name), time=per_case)
            counts["tests"] += 1
            if not gate.passed:
                counts["failures"] += 1
                ET.SubElement(case, "failure", message=_clean(gate.detail), type="parity.gate").text = _clean(
                    f"{gate.detail}\n{context}")
            ET.SubElement(case, "system-out").text = _clean(f"{gate.detail}; {context}")
    if summary.failure:
        case = ET.SubElement(suite, "testcase", classname="parity", name="engine", time="0")
        ET.SubElement(case, "error", message=_clean(summary.failure), type="parity.engine")
        counts["tests"] += 1
        counts["errors"] += 1
    for element in (suite, suites):
        for key, value in counts.items():
            element.set(key, str(value))
    return suites


def write(summary: Summary | dict, path: Path) -> None:
    """Write junit.xml atomically."""
    tree = ET.ElementTree(build(summary if isinstance(summary, Summary) else Summary.from_json(summary)))
    from parity.outdir import atomic_write_with

    atomic_write_with(Path(path), lambda tmp: tree.write(tmp, encoding="utf-8", xml_declaration=True))
