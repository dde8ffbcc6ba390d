"""Quantised members (issue 16): delta bytes of quantised checkpoints factored against their float base, as a
share of the quantised checkpoint's own bytes, side by side with zstd -3 of that checkpoint, in one run.

The checkpoints are made at bench time by fixtures/quantized.py with the compressed-tensors library: a Llama
base (hidden 512, 4 layers, random initialisation) from a config; an fp8 (E4M3, one scale per output
channel) round-to-nearest copy of it; a short fine-tune of it (3 Adam steps, lr 1e-4) quantised the same
way; int4 pack-quantized copies (groups of 32) of the base and of the fine-tune; and two int4 copies in the
GPTQ layout: round to nearest, and GPTQ-made (error compensation calibrated on random tokens, codes moved
wherever it chose). Every member is stored lossless.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, ROOT, fmt_bytes, machine_info, machine_line, md_table, write_results

sys.path.insert(0, str(ROOT / "fixtures"))
import quantized as qz

import wfactor

WORK = BENCH / "work" / "quantized"


def main() -> None:
    torch.set_num_threads(1)
    if WORK.exists():
        shutil.rmtree(WORK)
    base = qz.make_llama(WORK / "base", hidden=512, layers=4)
    ft = qz.finetune(base, WORK / "ft", steps=3, lr=1e-4)
    members = {
        "fp8 copy of the base (round to nearest)": qz.quantize_fp8(base, WORK / "fp8"),
        "fp8 of a fine-tune (3 steps, lr 1e-4)": qz.quantize_fp8(ft, WORK / "ft_fp8"),
        "int4 pack-quantized copy of the base (round to nearest)": qz.quantize_int4(base, WORK / "int4"),
        "int4 pack-quantized fine-tune": qz.quantize_int4(ft, WORK / "ft_int4"),
        "int4 GPTQ layout, round to nearest": qz.gptq_layout(base, WORK / "gptq_rtn"),
        "int4 GPTQ-made copy of the base": qz.gptq_quantize(base, WORK / "gptq"),
    }
    names = {label: f"m{i}" for i, label in enumerate(members)}
    t0 = time.perf_counter()
    rep = wfactor.factor([f"{names[k]}={v}" for k, v in members.items()], base=str(base), out=WORK / "fam")
    seconds = time.perf_counter() - t0
    with wfactor.open_family(WORK / "fam") as fam:
        ok = fam.verify({names[k]: str(v) for k, v in members.items()}).ok
    rows, data = [], []
    for label, path in members.items():
        raw = (path / "model.safetensors").read_bytes()
        z = len(zstandard.ZstdCompressor(level=3).compress(raw))
        m = next(x for x in rep.members if x.name == names[label])
        codecs = ", ".join(f"{k} {v.tensors}" for k, v in sorted(m.codecs.items(), key=lambda kv: -kv[1].bytes))
        rows.append(
            [label, fmt_bytes(len(raw)), f"{z / len(raw):.3f}", f"**{m.delta_bytes / len(raw):.3f}**", codecs]
        )
        data.append({"member": label, "bytes": len(raw), "zstd3": z, "delta_bytes": m.delta_bytes, "codecs": codecs})
    info = machine_info()
    md = [
        "## Quantised members (issue 16)",
        "",
        f"Measured {machine_line(info)}; one run of `bench/quantized.py`; CPU; factoring took {seconds:.1f} s.",
        "",
        (
            "Checkpoints made here with compressed-tensors (`fixtures/quantized.py`): a Llama base (hidden 512, "
            "4 layers, random initialisation, float32) and six quantised members, factored against it in one "
            f"family, lossless (every tensor verified bit for bit: {'yes' if ok else 'NO'}). Bytes are shares of "
            "each quantised checkpoint's own file:"
        ),
        "",
        md_table(["member", "checkpoint", "zstd -3", "wfactor delta", "records"], rows, "lrrrl"),
        "",
        (
            "An fp8 weight is predicted from its float base as round(B / s) with the member's own scales (the "
            "`rescale` term, spec/FORMAT.md 4.2): a round-to-nearest copy needs no residual, so it costs its "
            "scales and its unquantised tensors' records. A quantised fine-tune pays the XOR of the codes that "
            "changed. Packed int4 codes (compressed-tensors `weight_packed`, GPTQ `qweight`) are predicted by "
            "quantising the base with the member's own scales and packing the codes in the member's layout (the "
            "`requant` term, spec 4.2 and 5.4), plus a code correction: all zero for a round-to-nearest copy, "
            "which then costs its scales (float32 per group of 32 inputs in the compressed-tensors copies, float16 "
            "in the GPTQ ones); the codes a fine-tune or GPTQ's error compensation moved for the others. The "
            "goal for a round-to-nearest int4 copy is 0.15."
        ),
    ]
    fp8_md, fp8_data = fp8_backbone(base, ft)
    md += fp8_md
    write_results(
        "quantized",
        "\n".join(md),
        {"seconds": seconds, "verified": ok, "members": data, "fp8_backbone": fp8_data},
    )


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst per-sequence cosine of two models' logits."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


def fp8_backbone(base: Path, ft: Path) -> tuple[list[str], dict[str, object]]:
    """``--backbone-dtype fp8`` against the float32 backbone: the same float members factored twice."""
    ft2 = qz.finetune(base, WORK / "ft2", steps=5, lr=1e-3, seed=2)
    members = {"fine-tune A (3 steps, lr 1e-4)": ft, "fine-tune B (5 steps, lr 1e-3)": ft2}
    names = {label: f"f{i}" for i, label in enumerate(members)}
    args = [f"{names[k]}={v}" for k, v in members.items()]
    rows, data = [], {}
    for dt in ("keep", "fp8"):
        out = WORK / f"fam_{dt}"
        rep = wfactor.factor(args, base=str(base), out=out, backbone_dtype=dt)
        with wfactor.open_family(out) as fam:
            resident = sum(t.nbytes for t in fam.backbone("cpu").values())
            cos = {}
            for label, path in members.items():
                mat = WORK / f"mat_{dt}_{names[label]}"
                fam.materialize(names[label], mat)
                cos[label] = _cosine(qz.logits(mat), qz.logits(path))
        deltas = {label: next(m for m in rep.members if m.name == names[label]).delta_bytes for label in members}
        label = "float32 (default)" if dt == "keep" else "fp8 (`--backbone-dtype fp8`)"
        rows.append(
            [label, fmt_bytes(rep.backbone_bytes), fmt_bytes(resident)]
            + [f"{fmt_bytes(deltas[k])}, {cos[k]:.6f}" for k in members]
        )
        data[dt] = {"backbone_bytes": rep.backbone_bytes, "resident_bytes": resident, "delta_bytes": deltas, "cosine": cos}
    ref = {}
    for label, path in members.items():
        q = qz.quantize_fp8(path, WORK / f"ref_fp8_{names[label]}")
        ref[label] = _cosine(qz.logits(q), qz.logits(path))
    rows.append(["reference: each member's own fp8 checkpoint (compressed-tensors)", "", ""]
                + [f"-, {ref[k]:.6f}" for k in members])  # fmt: skip
    data["fp8_checkpoint_cosine"] = ref
    md = [
        "",
        "### Quantised backbone (`--backbone-dtype fp8`)",
        "",
        (
            "The same base and two float fine-tunes factored twice (default budget): with the float32 backbone, "
            "and with its matrices stored F8_E4M3 with one scale per row. Resident memory is the backbone a "
            "server holds once (`Family.backbone`); each cell gives the member's delta and the worst cosine of "
            "its rebuilt logits (materialised, loaded in transformers) with the original member's, over 3 random "
            "token sequences; the last row is each member quantised to fp8 on its own, for comparison:"
        ),
        "",
        md_table(["backbone", "file", "resident"] + list(members), rows, "lrr" + "r" * len(members)),
        "",
        (
            "Members on an fp8 backbone are their change from the base carried onto its fp8 view, so they carry "
            "the backbone's rounding as an fp8 checkpoint would; their deltas grow by one float32 scale per row "
            "of each tensor (the `rescale` term). Rebuilt members are materialised at full precision: attaching "
            "them factored over the fp8 backbone (fp8 base matmuls) is not done."
        ),
    ]
    return md, data


if __name__ == "__main__":
    main()
