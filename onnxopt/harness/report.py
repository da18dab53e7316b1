"""The verdict of a check: per-level, per-output results, as a table, JSON or JUnit."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree

from onnxopt.harness.compare import LevelResult, json_number
from onnxopt.harness.judge import MetricSpec
from onnxopt.harness.layers import LayerComparison

log = logging.getLogger(__name__)


@dataclass
class Report:
    """The verdict of a check: per optimization level, per output."""

    reference: str
    candidate: str
    profile: str
    samples: int
    levels: list[LevelResult]
    notes: list[str] = field(default_factory=list)
    layers: list[LayerComparison] | None = None
    metrics: list[MetricSpec] = field(default_factory=list)  # what judged each output, and why

    @property
    def passed(self) -> bool:
        """True when the candidate matched at every level checked."""
        return all(level.passed for level in self.levels)

    def failures(self) -> list[str]:
        """Return one line per failing output or problem."""
        lines: list[str] = []
        for level in self.levels:
            lines.extend(f"[{level.level}] {p}" for p in level.problems)
            for out in level.outputs:
                if not out.passed:
                    lines.append(f"[{level.level}] {out.name}: {'; '.join(out.reasons)}")
            lines.extend(f"[{level.level}] {m.describe()}" for m in level.metrics if m.output == "*" and not m.passed)
        return lines

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        data: dict[str, Any] = {
            "reference": self.reference,
            "candidate": self.candidate,
            "profile": self.profile,
            "samples": self.samples,
            "passed": self.passed,
            "levels": [level.to_dict() for level in self.levels],
            "notes": self.notes,
            "metrics": [
                {"output": m.output, "metric": m.label, "floor": m.floor, "reason": m.reason} for m in self.metrics
            ],
        }
        if self.layers is not None:
            data["layers"] = [dataclasses.asdict(x) for x in self.layers]
        return json.loads(json.dumps(data, default=json_number))

    def to_junit(self) -> str:
        """Return a JUnit XML document: one test case per output and level."""
        suite = ElementTree.Element(
            "testsuite", name="onnxopt.check", tests=str(sum(len(lv.outputs) for lv in self.levels))
        )
        failures = 0
        for level in self.levels:
            for problem in level.problems:
                case = ElementTree.SubElement(suite, "testcase", classname=f"check.{level.level}", name="structure")
                ElementTree.SubElement(case, "failure", message=problem)
                failures += 1
            for out in level.outputs:
                case = ElementTree.SubElement(suite, "testcase", classname=f"check.{level.level}", name=out.name)
                if not out.passed:
                    ElementTree.SubElement(case, "failure", message="; ".join(out.reasons))
                    failures += 1
        suite.set("failures", str(failures))
        return ElementTree.tostring(suite, encoding="unicode")
