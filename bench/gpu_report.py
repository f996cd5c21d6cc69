"""The markdown section and the file writes of `gpu_suite.py` (BENCHMARKS.md-ready, not BENCHMARKS.md)."""
from __future__ import annotations

import os
from pathlib import Path


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.3f}"


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.0f}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.0%}"


def markdown(r: dict) -> str:
    env = r["environment"]
    lines = [f"## GPU suite: {env['device']}", "",
             f"`{r.get('command', 'python bench/gpu_suite.py')}`{' (tiny shapes: proves the code paths, measures nothing)' if env['dry_run'] else ''}; "
             f"torch {env['torch']}, triton {env['triton']}, {r['seconds']:.0f} s in all.", ""]
    failed = {k: v["error"] for k, v in r.items() if isinstance(v, dict) and "error" in v}
    skipped = {k: v["skipped"] for k, v in r.items() if isinstance(v, dict) and "skipped" in v}
    for name, why in {**failed, **skipped}.items():
        lines.append(f"- **{name}**: {'failed' if name in failed else 'skipped'}: {why}")
    if failed or skipped:
        lines.append("")
    bw = r.get("bandwidth", {}).get("bytes_per_s")
    if bw:
        lines += [f"Measured copy bandwidth: **{bw / 1e9:.0f} GB/s** (read + write of a {r['bandwidth']['buffer_bytes'] >> 20} MiB buffer).", ""]
    if "error" not in r.get("kernels", {"error": 1}):
        lines += ["| kernel | relative error (worst of output and gradients) | tolerance | |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['max_relative_error']:.1e} | {v['tolerance']:.0e} | {'pass' if v['passed'] else '**FAIL**'} |" for k, v in r["kernels"].items()]
        lines.append("")
    if "error" not in r.get("kernel_speed", {"error": 1}):
        lines += ["Forward + backward, ms and peak MiB above the inputs; forward bandwidth as a fraction of the copy's "
                  "(on a GPU, timed by replaying a CUDA graph of the forward):", "",
                  "| kernel | Triton ms | eager ms | compile ms | Triton MiB | eager MiB | compile MiB | fwd bw Triton / eager / compile |",
                  "|---|---|---|---|---|---|---|---|"]
        for k, v in r["kernel_speed"].items():
            bws = " / ".join(_pct(v.get(f"{s}_forward_bandwidth_fraction")) for s in ("triton", "eager", "compile"))
            lines.append(f"| {k} | {_ms(v['triton_s'])} | {_ms(v['eager_s'])} | {_ms(v['compile_s'])} | {_mib(v['triton_peak_bytes'])} | "
                         f"{_mib(v['eager_peak_bytes'])} | {_mib(v['compile_peak_bytes'])} | {bws} |")
        lines.append("")
        lines += _fused_loss_memory(r["kernel_speed"].get("linear_cross_entropy", {}))
    p = r.get("parity", {})
    if "max_abs_diff" in p:
        lines += [f"bf16 logits against transformers (tiny random Llama): max |diff| {p['max_abs_diff']:.3g}, relative error "
                  f"{p['relative_error']:.2e}, argmax agreement {p['argmax_agreement']:.1%}.", ""]
    t = r.get("sft", {})
    if "tokens_per_s" in t:
        lines += [f"SFT step, Llama-3.2-1B shape, {t['batch']} x {t['seq']} tokens: {t['step_s']:.3f} s, {t['tokens_per_s']:.0f} tokens/s, "
                  f"{t['flops_per_s'] / 1e12:.1f} TFLOP/s, MFU {_pct(t['mfu'])}.", ""]
    d = r.get("decode", {})
    if "batch 1" in d:
        lines += [f"Greedy decode, Llama-3.1-8B shape ({d['layers']} layers), {d['dtype']}, eager, Triton kernels {'on' if d.get('kernels') else 'off'}:", "",
                  "| batch | ms/step | tokens/s | GB read/step | fraction of copy bandwidth |", "|---|---|---|---|---|"]
        lines += [f"| {k[6:]} | {_ms(v['step_s'])} | {v['tokens_per_s']:.0f} | {v['bytes_per_step'] / 1e9:.2f} | {_pct(v['bandwidth_fraction'])} |"
                  for k, v in d.items() if k.startswith("batch")]
        lines.append("")
    sv = r.get("server", {})
    if "out tok/s" in sv:
        lines += [f"Server ({sv['model']}, {sv['streams']} streams, {sv['requests']} requests x {sv['max_tokens']} tokens): "
                  f"{sv['out tok/s']:.0f} output tokens/s, {sv['req/s']:.2f} req/s, TTFT p50 {sv['TTFT p50 s']:.3f} s, "
                  f"TPOT p50 {sv['TPOT p50 ms']:.1f} ms; ready {sv['ready_s']:.0f} s after start.", ""]
    c = r.get("compiled_decode", {})
    if "compiled batch 1" in c:
        lines += [f"Greedy decode, the same model, eager against the compiled step ({c['layers']} layers; median of {c['steps']} timed "
                  "steps, after the untimed first ones; greedy agreement counts every step):", "",
                  "| batch | eager ms/step | compiled ms/step | speed-up | weights read, eager / compiled, of copy bandwidth | "
                  "compile + capture s | first step's logits, relative error | greedy tokens equal for |", "|---|---|---|---|---|---|---|---|"]
        for batch in (1, 32):
            e, k = c[f"eager batch {batch}"], c[f"compiled batch {batch}"]
            lines.append(f"| {batch} | {_ms(e['step_s'])} | {_ms(k['step_s'])} | {e['step_s'] / k['step_s']:.2f}x | "
                         f"{_pct(e['weight_bandwidth_fraction'])} / {_pct(k['weight_bandwidth_fraction'])} | {k['first_steps_s']:.1f} | "
                         f"{c[f'batch {batch} first_logits_relative_error']:.1e} | "
                         f"{c[f'batch {batch} tokens_equal_until']} of {c[f'batch {batch} tokens_compared']} steps |")
        lines.append("")
    return "\n".join(lines)


def _fused_loss_memory(v: dict) -> list[str]:
    """The goal's ratio, whole peak and peak beyond the two gradients every side must return."""
    if not v.get("eager_peak_bytes") or v.get("triton_peak_bytes") is None:
        return []
    grads = v["gradient_bytes"]
    beyond = (v["triton_peak_bytes"] - grads) / max(v["eager_peak_bytes"] - grads, 1)
    return [f"Fused cross-entropy peak memory: {v['triton_peak_bytes'] / v['eager_peak_bytes']:.1%} of eager's; "
            f"beyond the gradients ({_mib(grads)} MiB, returned by both) {beyond:.1%} of eager's.", ""]


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
