"""JUnit XML: one test case per prompt and gate, so CI systems show parity gates as tests."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path


def build(summary: dict) -> ET.Element:
    """The <testsuites> tree for a run summary."""
    suites = ET.Element("testsuites", name="parity")
    suite = ET.SubElement(suites, "testsuite", name=f"parity.{summary.get('recipe', {}).get('name', 'run')}")
    tests = failures = skipped = 0
    for prompt in summary["prompts"]:
        if prompt["status"] != "ok":
            case = ET.SubElement(suite, "testcase", classname=f"parity.{prompt['id']}", name="run")
            ET.SubElement(case, "skipped", message=f"prompt not run ({prompt['status']})")
            tests += 1
            skipped += 1
            continue
        for gate in prompt["gates"]:
            case = ET.SubElement(suite, "testcase", classname=f"parity.{prompt['id']}", name=gate["name"])
            tests += 1
            if not gate["passed"]:
                failures += 1
                ET.SubElement(case, "failure", message=gate["detail"]).text = gate["detail"]
    if summary.get("failure"):
        case = ET.SubElement(suite, "testcase", classname="parity", name="engine")
        ET.SubElement(case, "error", message=summary["failure"])
        tests += 1
        suite.set("errors", "1")
    suite.set("tests", str(tests))
    suite.set("failures", str(failures))
    suite.set("skipped", str(skipped))
    return suites


def write(summary: dict, path: Path) -> None:
    tree = ET.ElementTree(build(summary))
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tree.write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, path)
