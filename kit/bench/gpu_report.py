"""``bench gpu``'s lines and its README table: one line per backbone and step (cv, CPU-vs-GPU
agreement, train loop, embedding), and the markdown table of a run."""
from __future__ import annotations

import math


def _fmt(value, spec: str = ".1f", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def format_agreement(r: dict) -> str:
    f, a = r["fp32"], r["amp"]
    return (f"{r['backbone']:<16} CPU vs device, same seed, {r['steps']} steps, "
            f"{r['patches']} patches: fp32 max |dp| {f['max_abs']:.2e} (tol {f['tol']:g}: "
            f"{'ok' if f['ok'] else 'FAILED'}), AMP max |dp| {a['max_abs']:.2e} (tol "
            f"{a['tol']:g}: {'ok' if a['ok'] else 'FAILED'}), top class agrees "
            f"{100 * a['argmax_agree']:.0f} %, loss max |d| {r['loss_max_abs']:.1e}")


def format_cv(r: dict) -> str:
    return (f"{r['backbone']:<16} cv {r['seconds']:7.1f} s, {_fmt(r['patches_per_s'])} "
            f"train patches/s, peak {_fmt(r['peak_mem_gib'], '.2f')} GiB, OOF macro F1 "
            f"{r['oof_macro_f1']:.3f} [amp {r['amp']}, channels_last {r['channels_last']}, "
            f"workers {r['num_workers']}]")


def format_train(r: dict) -> str:
    return (f"{r['backbone']:<16} train: kit loop {r['kit_ips']:8.1f} patches/s, bare step "
            f"{r['bare_ips']:8.1f} patches/s, ratio {r['ratio']:.2f}x "
            f"[{r['workers']} loader workers]")


def format_embed(r: dict, device_type: str = "cuda") -> str:
    amp = ("bare AMP + channels_last" if device_type == "cuda"
           else "bare again (no AMP on the CPU)")
    return (f"{r['backbone']:<16} embed: kit {r['kit_ips']:8.1f} patches/s, bare fp32 forward "
            f"{r['bare_ips']:8.1f} patches/s ({r['ratio']:.2f}x of bare), {amp} "
            f"{r['bare_amp_ips']:8.1f} patches/s, kit with features.amp auto "
            f"{r['kit_amp_ips']:8.1f} patches/s")


def markdown(info: dict, results: dict) -> str:
    """The README table of one run."""
    lines = [f"GPU: {info.get('name', info['device'])} (capability {info.get('capability')}, "
             f"{info.get('memory_gib')} GiB), torch {info['torch']}, CUDA {info['cuda']}, "
             f"AMP {info['amp']}", "",
             "| backbone | cv patches/s | peak GiB | kit loop / bare step | embed kit / bare "
             "(patches/s) | CPU vs GPU max abs dp fp32 / AMP |", "|---|---|---|---|---|---|"]
    names = {r["backbone"] for part in results.values() for r in part}
    for name in sorted(names):
        def get(part):
            return next((r for r in results.get(part, [])
                         if r["backbone"] == name), None)  # noqa: B023 (called in this pass only)
        cv, tr, em, ag = get("cv"), get("train"), get("embed"), get("agreement")
        cells = [name, _fmt(cv and cv["patches_per_s"]), _fmt(cv and cv["peak_mem_gib"], ".2f"),
                 "%.0f / %.0f (%.2fx)" % (tr["kit_ips"], tr["bare_ips"], tr["ratio"]) if tr
                 else "-",
                 "%.0f / %.0f (%.2fx)" % (em["kit_ips"], em["bare_ips"], em["ratio"]) if em
                 else "-",
                 "%.1e / %.1e" % (ag["fp32"]["max_abs"], ag["amp"]["max_abs"]) if ag else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
