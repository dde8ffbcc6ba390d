"""The planner's side: one ``wfactor.factor`` run at one budget, rebuilt through ``wfactor.open_family``,
evaluated on every member and counted (stored part bytes, file headers, the recipes chosen)."""

from __future__ import annotations

import dataclasses
import json
import struct
import time
from pathlib import Path

from common import MEMBERS, Evaluator

import wfactor
from lossy.points import Point
from wfactor.format.constants import META_RECORDS


def payload_bytes(path: Path) -> int:
    """Bytes of a safetensors file's data section: the file minus its 8-byte length and JSON header."""
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - hlen


def record_options(path: Path) -> dict[str, int]:
    """How many tensors of a delta file use each recipe (q4 = 4-bit quant, r8 = rank 8, +xor = residual)."""
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    records = json.loads(header.get("__metadata__", {}).get(META_RECORDS, "[]"))
    out: dict[str, int] = {}
    for rec in records:
        words = []
        for t in rec.get("terms") or []:
            params = t.get("params") or {}
            if t["codec"] == "quant":
                words.append(f"q{params.get('bits')}")
            elif t["codec"] == "lowrank":
                words.append(f"r{params.get('rank')}")
            else:
                words.append(t["codec"])
        if not words:
            words.append(
                "identical" if not rec.get("residual") and not (rec.get("error") or {}).get("rel_l2") else "base"
            )
        if rec.get("residual"):
            words.append("xor")
        key = "+".join(words)
        out[key] = out.get(key, 0) + 1
    return out


def budget_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(wfactor.Budget)}


def run_planner(ev: Evaluator, tmp: Path, label: str, budget: wfactor.Budget) -> Point:
    out = tmp / label.replace("=", "_").replace(" ", "_").replace(",", "")
    family = ev.family
    members = [f"{m}={family / m}" for m in MEMBERS]
    t0 = time.perf_counter()
    rep = wfactor.factor(members, base=str(family / "base"), out=out, budget=budget)
    t_factor = time.perf_counter() - t0
    fam = wfactor.open_family(out)
    try:
        cos = {m: ev.worst(m, fam.state_dict(m)) for m in MEMBERS}
    finally:
        fam.close()
    backbone = out / "backbone.safetensors"
    deltas = {m: out / "deltas" / f"{m}.safetensors" for m in MEMBERS}
    disk = backbone.stat().st_size + sum(p.stat().st_size for p in deltas.values())
    codecs: dict[str, dict[str, list[int]]] = {}
    for mr in rep.members:
        codecs[mr.name] = {k: [int(v.tensors), int(v.bytes)] for k, v in getattr(mr, "codecs", {}).items()}
    p = Point(
        "planner",
        label,
        backbone.stat().st_size,
        {m: payload_bytes(deltas[m]) for m in MEMBERS},
        cos,
        disk=disk,
        extra={
            "factor_s": round(t_factor, 2),
            "codecs": codecs,
            "options": {m: record_options(deltas[m]) for m in MEMBERS},
            "header_bytes": {m: deltas[m].stat().st_size - payload_bytes(deltas[m]) for m in MEMBERS},
            "report_family_bytes": rep.family_bytes,
        },
    )
    del rep
    return p
