"""Towers (issue 14): families whose members hold the base's tower under other names, factored with name-only
matching (what wfactor did before: ``--names-only``) and with alignment, side by side in one run; and the
memory of N attached members against N full models.

The models are tiny real transformers models built from configs and trained a few Adam steps on CPU by
fixtures/towers.py (generated at bench time in bench/work/towers/, never committed):

- Llama: a base; ``chat`` (LlamaForCausalLM fine-tune); ``reranker`` (LlamaForSequenceClassification from the
  base, all trained) and ``reranker_frozen`` (only its ``score`` trained); ``vlm`` (LLaVA, language model
  from the base, all trained, CLIP vision tower) and ``vlm_frozen`` (only the projector trained).
- T5: a T5ForConditionalGeneration base; ``sd3`` (a pipeline whose ``text_encoder_3/`` is a T5 encoder
  fine-tune, plus a random SD3 transformer); ``blip2`` (its T5 language model is the base).
- Two bases (``--base text=... --base vision=...``): ``chat`` (Llama), ``retrieval`` (CLIP vision fine-tune),
  ``vlm`` (LLaVA of both towers).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, ROOT, fmt_bytes, fmt_cos, machine_info, machine_line, md_table, storage_bytes, write_results

sys.path.insert(0, str(ROOT / "fixtures"))
import towers

import wfactor
import wfactor.torch as wt

WORK = BENCH / "work" / "towers"
LLAVA_RENAME = towers.LLAVA_RENAME


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def family_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


cosine = towers.rebuilt_cosine


def run_family(label: str, paths: dict[str, Path], members: list[str], base: Any, cos_component: dict[str, str]):
    args = [f"{m}={paths[m]}" for m in members]
    out: dict[str, Any] = {}
    for kind, infer in (("names", False), ("aligned", True)):
        for budget_name, budget in (("default", wfactor.Budget()), ("lossless", wfactor.Budget(lossless=True))):
            dest = WORK / f"{label}-{kind}-{budget_name}"
            t0 = time.perf_counter()
            rep = wfactor.factor(args, base=base, out=dest, budget=budget, infer=infer)
            out[(kind, budget_name)] = (dest, rep, time.perf_counter() - t0)
    raw = sum(weights_bytes(paths[m]) for m in members) + sum(
        weights_bytes(Path(b.split("=", 1)[1] if "=" in b else b)) for b in ([base] if isinstance(base, str) else base)
    )
    rows, data = [], []
    for m in members:
        r = {k: next(x for x in v[1].members if x.name == m) for k, v in out.items()}
        al = r[("aligned", "default")].alignment
        rules = ", ".join(f"`{u['from']}`→`{u['to']}`" for u in al["rules"] if u["accepted"]) or "none"
        cos = cosine(out[("aligned", "default")][0], m, paths[m], cos_component.get(m))
        rows.append(
            [
                m,
                fmt_bytes(r[("names", "default")].original_bytes),
                f"{r[('names', 'default')].ratio:.3f}",
                f"**{r[('aligned', 'default')].ratio:.3f}**",
                f"{r[('names', 'lossless')].ratio:.3f}",
                f"**{r[('aligned', 'lossless')].ratio:.3f}**",
                f"{al['aligned_share']:.0%}",
                rules,
                fmt_cos(cos),
            ]
        )
        data.append(
            {
                "member": m,
                "original_bytes": r[("names", "default")].original_bytes,
                "delta_bytes": {f"{k[0]}/{k[1]}": v.delta_bytes for k, v in r.items()},
                "alignment": {k: v for k, v in al.items() if k != "member_only"},
                "worst_output_cosine": cos,
            }
        )
    totals = {f"{k[0]}/{k[1]}": family_bytes(v[0]) for k, v in out.items()}
    seconds = {f"{k[0]}/{k[1]}": v[2] for k, v in out.items()}
    rows.append(
        [
            "**family** (backbone + deltas, every file)",
            fmt_bytes(raw),
            f"{totals['names/default'] / raw:.3f}",
            f"**{totals['aligned/default'] / raw:.3f}**",
            f"{totals['names/lossless'] / raw:.3f}",
            f"**{totals['aligned/lossless'] / raw:.3f}**",
            "",
            "",
            "",
        ]
    )
    return rows, {"raw_bytes": raw, "family_bytes": totals, "seconds": seconds, "members": data}, out


def memory(llama: dict[str, Path], fam: Path) -> tuple[list[list[Any]], list[dict[str, int]]]:
    from transformers import AutoConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlavaForConditionalGeneration

    classes = {
        "chat": LlamaForCausalLM,
        "reranker": LlamaForSequenceClassification,
        "reranker_frozen": LlamaForSequenceClassification,
        "vlm": LlavaForConditionalGeneration,
        "vlm_frozen": LlavaForConditionalGeneration,
    }
    rows, data = [], []
    attached: list[torch.nn.Module] = []
    full: list[torch.nn.Module] = []
    with wfactor.open_family(fam) as f:
        for n, (m, cls) in enumerate(classes.items(), start=1):
            with wt.empty_weights():
                mod = cls(AutoConfig.from_pretrained(llama[m]))
            rename = LLAVA_RENAME if cls is LlavaForConditionalGeneration else None
            attached.append(wt.attach(mod, f, m, device="cpu", rename=rename))
            full.append(towers.load_model(llama[m]))
            a, b = storage_bytes(attached), storage_bytes(full)
            rows.append([n, ", ".join(list(classes)[:n]), fmt_bytes(b), fmt_bytes(a), f"{a / b:.2f}"])
            data.append({"n": n, "full_bytes": b, "attached_bytes": a})
    return rows, data


def main() -> None:
    torch.set_num_threads(1)
    if WORK.exists():
        shutil.rmtree(WORK)
    llama = towers.make_llama_family(WORK / "src" / "llama")
    t5 = towers.make_t5_family(WORK / "src" / "t5")
    two = towers.make_two_base_family(WORK / "src" / "two")
    fams = [
        ("llama", llama, ["chat", "reranker", "reranker_frozen", "vlm", "vlm_frozen"], str(llama["base"]), {}),
        ("t5", t5, ["sd3", "blip2"], str(t5["base"]), {"sd3": "text_encoder_3"}),
        ("two", two, ["chat", "retrieval", "vlm"], [f"text={two['text']}", f"vision={two['vision']}"], {}),
    ]
    sections, data = [], {}
    titles = {
        "llama": "Llama base; chat, reranker, LLaVA members",
        "t5": "T5 base; an SD3-style pipeline (`text_encoder_3/`) and BLIP-2 members",
        "two": "two bases (`--base text=llama --base vision=clip`); members of one tower or both",
    }
    results = {}
    for label, paths, members, base, comp in fams:
        rows, d, out = run_family(label, paths, members, base, comp)
        data[label] = d
        results[label] = out
        sections += [
            f"**{titles[label]}** (delta bytes / original bytes):",
            "",
            md_table(
                [
                    "member",
                    "original",
                    "names only",
                    "aligned",
                    "names only, lossless",
                    "aligned, lossless",
                    "bytes aligned",
                    "rules kept",
                    "worst output cosine (aligned, default)",
                ],
                rows,
                "lrrrrrrll",
            ),
            "",
        ]
    mem_rows, mem_data = memory(llama, results["llama"][("aligned", "default")][0])
    data["memory"] = mem_data
    info = machine_info()
    md = [
        "## Towers: one backbone under other names (issue 14)",
        "",
        f"Measured {machine_line(info)}; one run of `bench/towers.py`; CPU.",
        "",
        (
            "Tiny real transformers models from configs, trained a few Adam steps on CPU (`fixtures/towers.py`: "
            "hidden 48, 2 layers; so each tensor's record header is a visible share of its delta). Each family is "
            "factored four ways in this run: with name-only matching (`--names-only`, what wfactor did before "
            "towers) and with alignment (the default), at the default budget and lossless. Output cosine: the "
            "aligned default-budget rebuild against the original on fixed inputs (logits; the reranker's score at "
            "every position; the T5 encoder's hidden states; CLIP's hidden states and pooled output)."
        ),
        "",
        *sections,
        (
            "A member whose tower is bit-identical to the base (`reranker_frozen`, `vlm_frozen`, `blip2`) pays 0 "
            "payload bytes for it, only its records; with name-only matching the renamed ones were stored whole. "
            "What stays member-only is what no base holds: the reranker's `score`, LLaVA's projector and (one "
            "base) its CLIP tower, the SD3 transformer, BLIP-2's vision model and Q-Former."
        ),
        "",
        "Memory of N Llama-family members attached in one process on CPU (`wfactor.torch.attach`, distinct "
        "storages of parameters and buffers counted once; LLaVA attached with `rename=` for transformers 5's "
        "module names) against N models loaded in full with `from_pretrained`:",
        "",
        md_table(["N", "members", "N full models", "N attached", "ratio"], mem_rows),
        "",
        (
            "Attached members keep their quantised deltas factored (codes + scales over the shared backbone "
            "tensor), and tensors identical to the backbone are its own storage in every member: the reranker's "
            "and LLaVA's frozen towers are one copy of the base."
        ),
    ]
    write_results("towers", "\n".join(md), data)


if __name__ == "__main__":
    main()
