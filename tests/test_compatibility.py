"""The normserve.v1 contract only grows (docs/compatibility.md): every service, method, message,
field and enum value of the recorded baseline is still there, with the same number, type,
cardinality and streaming; nothing is renamed or renumbered. Additions pass.

The baseline, tests/compat/normserve_v1.json, is the contract as released. After an *additive*
change it can be refreshed with ``NORMSERVE_UPDATE_COMPAT=1 python -m pytest
tests/test_compatibility.py`` (this test still compares first, so a breaking change cannot be
recorded as the new baseline).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor

from normserve.v1 import normserve_pb2 as pb

BASELINE = Path(__file__).parent / "compat" / "normserve_v1.json"


def _enum(e: EnumDescriptor) -> dict[str, int]:
    return {v.name: v.number for v in e.values}


def _message(m: Descriptor, out: dict[str, Any]) -> None:
    out["messages"][m.full_name] = {
        f.name: {
            "number": f.number,
            "type": f.type,
            "label": "repeated" if f.is_repeated else "optional" if f.has_presence else "singular",
            "type_name": (f.message_type or f.enum_type).full_name
            if (f.message_type or f.enum_type)
            else "",
            "oneof": f.containing_oneof.name
            if f.containing_oneof is not None and not f.containing_oneof.name.startswith("_")
            else "",
        }
        for f in m.fields
    }
    for e in m.enum_types:
        out["enums"][e.full_name] = _enum(e)
    for nested in m.nested_types:
        _message(nested, out)


def contract(file: FileDescriptor) -> dict[str, Any]:
    """What a client written from the .proto relies on, as plain JSON."""
    out: dict[str, Any] = {"services": {}, "messages": {}, "enums": {}}
    for s in file.services_by_name.values():
        out["services"][s.full_name] = {
            m.name: {
                "input": m.input_type.full_name,
                "output": m.output_type.full_name,
                "client_streaming": m.client_streaming,
                "server_streaming": m.server_streaming,
            }
            for m in s.methods
        }
    for m in file.message_types_by_name.values():
        _message(m, out)
    for e in file.enum_types_by_name.values():
        out["enums"][e.full_name] = _enum(e)
    return out


def breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Everything in ``old`` that ``new`` lost or changed (additions are not listed)."""
    found: list[str] = []
    for section in ("services", "messages", "enums"):
        for name, members in old[section].items():
            if name not in new[section]:
                found.append(f"{section[:-1]} {name} was removed or renamed")
                continue
            for member, shape in members.items():
                now = new[section][name].get(member)
                if now is None:
                    found.append(f"{name}.{member} was removed or renamed")
                elif now != shape:
                    found.append(f"{name}.{member} changed: {shape} -> {now}")
        if section == "enums":  # a number must not come back under another name
            for name, values in old[section].items():
                by_number = {n: v for v, n in new[section].get(name, {}).items()}
                for value, number in values.items():
                    if by_number.get(number, value) != value:
                        found.append(f"{name} number {number} now means {by_number[number]}")
    return found


def test_the_contract_only_grows() -> None:
    current = contract(pb.DESCRIPTOR)
    baseline = json.loads(BASELINE.read_text())
    broken = breaking_changes(baseline, current)
    assert not broken, "normserve.v1 must stay compatible (docs/compatibility.md):\n" + "\n".join(
        broken
    )
    if os.environ.get("NORMSERVE_UPDATE_COMPAT") == "1":
        BASELINE.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")


def test_the_check_sees_breaking_changes() -> None:
    baseline = json.loads(BASELINE.read_text())
    changed = json.loads(json.dumps(baseline))
    request = changed["messages"]["normserve.v1.NormalizeRequest"]
    request["session_id"]["number"] = 99  # renumbered
    del request["mode"]  # removed
    changed["services"]["normserve.v1.Normalizer"]["NormalizeStream"]["server_streaming"] = False
    dtypes = changed["enums"]["normserve.v1.DType"]
    dtypes["DTYPE_HALF"] = dtypes.pop("DTYPE_FLOAT16")  # renamed
    changed["messages"]["normserve.v1.Session"]["brand_new"] = {"number": 50}  # added: fine
    broken = breaking_changes(baseline, changed)
    assert len(broken) == 5, broken
    assert any("NormalizeRequest.session_id changed" in b for b in broken)
    assert any("NormalizeRequest.mode was removed" in b for b in broken)
    assert any("DType number" in b and "DTYPE_HALF" in b for b in broken)
