"""Whole pipelines as members (issue 8): bytes and memory of a family of diffusers pipelines against N full
pipelines.

The pipelines are generated at bench time (never committed) in bench/work/pipelines/ by
fixtures/tiny_pipelines.py at WIDTH times the tests' channel counts: a base Stable-Diffusion-style
pipeline (UNet, VAE, CLIP text encoder, tokenizer, scheduler), a "turbo" variant whose UNet drifts
everywhere, a style fine-tune with a rank-2 LoRA merged into the UNet's attention projections, and one with
a fine-tuned text encoder. All four are factored with the base as backbone (the base is also a member, so
the family serves four pipelines), lossless and at the default budget.

Reported: family bytes vs the four pipelines side by side; per member and component, the delta payload
(stored parts) and the header (records JSON); the worst cosine of one denoising step (fixed latents,
timestep and prompt tokens) of the default-budget rebuild against the original; memory of N pipelines on
CPU, each component attached with ``wfactor.torch.attach(..., component=...)`` (distinct tensor storages
counted once: identical components are one backbone tensor for all members) against N pipelines loaded
in full.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, ROOT, fmt_bytes, machine_info, machine_line, md_table, storage_bytes, write_results

sys.path.insert(0, str(ROOT / "fixtures"))
from tiny_pipelines import VARIANTS, build_models, build_pipelines, denoise_step, fixed_inputs

import wfactor
import wfactor.torch as wt
from wfactor.inputs import open_source

WORK = BENCH / "work" / "pipelines"
WIDTH = 8
COMPONENTS = ["text_encoder", "unet", "vae"]


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def component_payload(fam: wfactor.Family, member: str) -> dict[str, dict[str, int]]:
    """Per component: stored part bytes and the bytes of its records in the delta's JSON header."""
    out = {c: {"payload": 0, "records_json": 0, "tensors": 0} for c in COMPONENTS}
    with fam.open_delta(member) as d:
        for rec in d.records.values():
            c = out[rec.name.split("/", 1)[0]]
            c["payload"] += sum(d.file.tensors[p.key].nbytes for p in rec.part_specs())
            c["records_json"] += len(json.dumps(rec.to_json(), separators=(",", ":")).encode())
            c["tensors"] += 1
    return out


def load_components(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    with open_source(str(folder)) as src:
        out: dict[str, dict[str, torch.Tensor]] = {c: {} for c in COMPONENTS}
        for k in src.keys():
            comp, local = k.split("/", 1)
            out[comp][local] = src.tensor(k)
    return out


def full_pipeline(folder: Path) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    unet, vae, te = build_models(0, WIDTH)
    sds = load_components(folder)
    unet.load_state_dict(sds["unet"])
    vae.load_state_dict(sds["vae"])
    te.load_state_dict(sds["text_encoder"], strict=False)
    return unet, vae, te


def main() -> None:
    torch.set_num_threads(1)
    if WORK.exists():
        shutil.rmtree(WORK)
    pipes = build_pipelines(WORK / "src", WIDTH)
    raw = sum(weights_bytes(p) for p in pipes.values())
    args = [f"{m}={pipes[m]}" for m in VARIANTS]
    fams = {}
    for kind, budget in (("lossless", wfactor.Budget(lossless=True)), ("default", wfactor.Budget())):
        rep = wfactor.factor(args, base=str(pipes["base"]), out=WORK / kind, budget=budget)
        fams[kind] = (WORK / kind, rep)

    x = fixed_inputs()
    rows, data_members = [], []
    fam_path, rep = fams["default"]
    with wfactor.open_family(fam_path) as fam:
        for mr in rep.members:
            m = mr.name
            comps = component_payload(fam, m)
            unet, _vae, te = full_pipeline(pipes[m])
            y_orig = denoise_step(unet, te, x)
            unet.load_state_dict(fam.state_dict(m, component="unet"))
            te.load_state_dict(fam.state_dict(m, component="text_encoder"), strict=False)
            y = denoise_step(unet, te, x)
            cos = torch.nn.functional.cosine_similarity(y.flatten(), y_orig.flatten(), dim=0).item()
            lossless_delta = fams["lossless"][1].members[[r.name for r in fams["lossless"][1].members].index(m)]
            rows.append(
                [m, fmt_bytes(weights_bytes(pipes[m]))]
                + [fmt_bytes(comps[c]["payload"]) for c in COMPONENTS]
                + [fmt_bytes(mr.delta_bytes), fmt_bytes(lossless_delta.delta_bytes), f"{cos:.6f}"]
            )
            data_members.append(
                {
                    "member": m,
                    "components": comps,
                    "delta_bytes": mr.delta_bytes,
                    "cosine_one_step": cos,
                    "lossless_delta_bytes": lossless_delta.delta_bytes,
                    "pipeline_bytes": weights_bytes(pipes[m]),
                }
            )

    # memory of N pipelines: attached per component vs loaded in full
    mem_rows, mem_data = [], []
    with wfactor.open_family(fams["default"][0]) as fam:
        attached: list[torch.nn.Module] = []
        full: list[torch.nn.Module] = []
        for n, m in enumerate(VARIANTS, start=1):
            unet, vae, te = build_models(0, WIDTH)
            attached += [
                wt.attach(unet, fam, m, device="cpu", component="unet"),
                wt.attach(vae, fam, m, device="cpu", component="vae"),
                wt.attach(te, fam, m, device="cpu", component="text_encoder"),
            ]
            full += list(full_pipeline(pipes[m]))
            a, f = storage_bytes(attached), storage_bytes(full)
            mem_rows.append(
                [n, ", ".join(VARIANTS[:n]), fmt_bytes(f), fmt_bytes(a), f"{a / f:.2f}", f"{1 - a / f:.0%}"]
            )
            mem_data.append({"n": n, "full_bytes": f, "attached_bytes": a})

    info = machine_info()
    by_kind = {k: (sum(p.stat().st_size for p in v[0].rglob("*") if p.is_file()), v[1]) for k, v in fams.items()}
    md = [
        "## Pipelines as members (issue 8)",
        "",
        f"Measured {machine_line(info)}; one run of `bench/pipelines.py`; CPU.",
        "",
        (
            f"Four Stable-Diffusion-style pipelines built from configs by `fixtures/tiny_pipelines.py` at width {WIDTH} "
            f"({fmt_bytes(weights_bytes(pipes['base']))} of weights each: UNet, VAE, CLIP text encoder; plus tokenizer and "
            "scheduler files): `base`; `turbo` (every UNet tensor drifts by 5% noise); `style` (rank-2 LoRA merged into "
            "the UNet's 32 attention projections); `te_ft` (text encoder drifts by 2%). Factored with the base as "
            "backbone and as a member, so the family serves all four."
        ),
        "",
        md_table(
            ["", "4 pipelines side by side", "family, lossless", "family, default budget"],
            [
                [
                    "bytes (weights; the family: every file)",
                    fmt_bytes(raw),
                    fmt_bytes(by_kind["lossless"][0]),
                    fmt_bytes(by_kind["default"][0]),
                ],
                ["ratio", "1.00", f"{by_kind['lossless'][0] / raw:.3f}", f"{by_kind['default'][0] / raw:.3f}"],
            ],
        ),
        "",
        "Per member at the default budget: delta payload per component (stored parts; a component identical to "
        "the base's costs 0), the whole delta file (payload + header: the records, one per tensor, named "
        "`<component>/<tensor>`), the lossless delta, and the cosine of one UNet denoising step (the member's own "
        "text encoding of fixed tokens, fixed latents, t = 500) of the rebuilt pipeline against the original:",
        "",
        md_table(
            ["member", "pipeline weights"]
            + [f"{c} payload" for c in COMPONENTS]
            + ["delta file", "delta file, lossless", "one-step cosine"],
            rows,
        ),
        "",
        "Memory of N pipelines in one process on CPU (parameters and buffers, distinct storages counted once): "
        "loaded in full vs each component attached with `wfactor.torch.attach(module, family, member, "
        "component=...)` (identical components are the backbone's tensors, shared by every member; the LoRA "
        "stays factored):",
        "",
        md_table(["N", "pipelines", "N full pipelines", "N attached", "ratio", "saved"], mem_rows),
        "",
        (
            "Real pipelines (the seed's estimates: 48% saved for Flux schnell + dev, 66% for SDXL turbo + base + "
            "2 styles) are not measured: that needs their checkpoints, and nothing is downloaded here. Which "
            "components are bit-identical across such releases (text encoders, VAE) cannot be read from their "
            "configs; it is what sets the saving, since a shared component costs its records only, and a "
            "drifting UNet or transformer costs what its drift needs (see the planner section)."
        ),
    ]
    write_results(
        "pipelines",
        "\n".join(md),
        {
            "width": WIDTH,
            "raw_bytes": raw,
            "family_bytes": {k: v[0] for k, v in by_kind.items()},
            "members": data_members,
            "memory": mem_data,
        },
    )


if __name__ == "__main__":
    main()
