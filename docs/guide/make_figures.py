"""Make the guide's figures from the code they illustrate (CPU, well under a minute).

    python docs/guide/make_figures.py                 # writes docs/guide/figures/*.png
    python docs/guide/make_figures.py --check         # also fail if a page's generated block is stale

- loss_mask.png and the block in chat-template-and-loss-mask.md: a conversation through the
  embedded model's chat template, each token coloured by whether SFT trains on it
  (`eeyore.model.chat.tokenize_conversation`, the spans `eeyore.train.sft.make_example` turns
  into labels).
- rope_scaling.png: Llama-3.1-8B's RoPE wavelengths with and without its "llama3" scaling
  (`eeyore.model.llama.rope_inverse_frequencies`).
- eot_probability.png: the probability that the embedded model ends its turn at each length of
  a fixed reply, under the sampler's processors with and without the reference's end-of-turn bias and
  exponential decay (`eeyore.serve.sampler`).
- timeline.png: which request holds which KV-cache slot at each step of a real engine run on the
  embedded model (`batching_timeline.py`, over the engine's `trace` hook).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

GUIDE = Path(__file__).resolve().parent
sys.path.insert(0, str(GUIDE.parents[1]))  # run from a checkout without installing

from eeyore.model import ChatTemplate, Llama, LlamaConfig, Tokenizer, tokenize_conversation  # noqa: E402
from eeyore.model.llama import rope_inverse_frequencies  # noqa: E402
from eeyore.model.pretrained import resolve_model_dir  # noqa: E402
from eeyore.serve.params import SamplingParams  # noqa: E402
from eeyore.serve.sampler import add_sequence_bias_, bias_table, decay_boost, decay_length_penalty_, truncate  # noqa: E402

from batching_timeline import embedded_trace, plot_timeline  # noqa: E402  (next to this file)

CONVERSATION = [
    {"role": "system", "content": "You will act as a help-seeker ... YOUR PROFILE: ... YOUR TASK: ..."},
    {"role": "user", "content": "Hi, what brings you here today?"},
    {"role": "assistant", "content": "I don't know. My sister made me."},
    {"role": "user", "content": "That sounds frustrating."},
    {"role": "assistant", "content": "Kind of. I just can't sleep."},
]
BLOCK = re.compile(r"(<!-- generated: loss mask -->\n)(.*?)(<!-- end generated -->)", re.S)


# ----------------------------------------------------------------------------- the loss mask


def trained_tokens(tok: Tokenizer) -> list[tuple[str, bool]]:
    """(token text, trained?) for every token of CONVERSATION, as SFT with --multiturn sees it."""
    ids, spans = tokenize_conversation(tok, CONVERSATION)
    trained = [any(a <= i < b for a, b in spans) for i in range(len(ids))]
    return [(tok.decode([t]), m) for t, m in zip(ids, trained)]


def diff_block(tokens: list[tuple[str, bool]]) -> str:
    """The conversation as a ```diff block: '+' lines are trained tokens, the rest are context.
    A line break stands for the newline token, whose own mark only the PNG shows."""
    lines, current, mark = [], "", None
    for text, trained in tokens:
        for piece in re.split(r"(\n)", text):
            if piece == "\n":
                lines.append(((mark if mark is not None else trained), current))
                current, mark = "", None
            elif piece:
                if mark is not None and mark != trained:
                    lines.append((mark, current))
                    current = ""
                current, mark = current + piece, trained
    if current:
        lines.append((mark, current))
    body = "\n".join(("+ " if m else "  ") + text for m, text in lines)
    return f"```diff\n{body}\n```\n"


def plot_loss_mask(tokens: list[tuple[str, bool]], path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(11, 3.6))
    x, y, width, char = 0.0, 0.0, 100.0, 1.05
    for text, trained in tokens:
        shown = text.replace("\n", "\\n")
        w = max(len(shown), 1) * char + 0.6
        if x + w > width:
            x, y = 0.0, y - 1.6
        ax.add_patch(Rectangle((x, y), w - 0.3, 1.2, facecolor="#7fd17f" if trained else "#e6e6e6", edgecolor="#999"))
        ax.text(x + 0.3, y + 0.6, shown, va="center", fontsize=7, family="monospace")
        x += w
        if text.endswith("\n"):
            x, y = 0.0, y - 1.6
    ax.set_xlim(-0.5, width + 0.5)
    ax.set_ylim(y - 0.5, 1.7)
    ax.axis("off")
    ax.set_title("SFT targets (green): every client turn's tokens and its end-of-turn token; grey tokens are context only",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------- RoPE


def plot_rope(path: Path) -> None:
    import matplotlib.pyplot as plt

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    plain = rope_inverse_frequencies(LlamaConfig())  # Llama-3.1-8B's defaults: theta 500000, head_dim 128
    scaled = rope_inverse_frequencies(LlamaConfig(rope_scaling=scaling))
    i = torch.arange(len(plain))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.semilogy(i, 2 * torch.pi / plain, label="rope_theta 500000 alone")
    a.semilogy(i, 2 * torch.pi / scaled, label="with llama3 scaling (factor 8)")
    for level, name in ((8192 / 4, "8192 / high_freq_factor"), (8192 / 1, "8192 / low_freq_factor")):
        a.axhline(level, color="grey", ls=":", lw=1)
        a.text(1, level * 1.15, name, fontsize=7, color="grey")
    a.set_xlabel("frequency index (pair i of the head's 64)")
    a.set_ylabel("wavelength (tokens)")
    a.set_title("Wavelength of each rotary frequency", fontsize=10)
    a.legend(fontsize=8)
    b.plot(i, scaled / plain)
    b.set_xlabel("frequency index")
    b.set_ylabel("scaled / original frequency")
    b.set_title("Short wavelengths kept, long ones divided by 8, a blend between", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- end of turn


def settings(eot: int) -> dict[str, SamplingParams]:
    """The sampler's processors on the same logits, three ways; the last is the reference's."""
    bias = (((eot,), -4.0),)
    return {
        "temperature 1, top-p 0.8 only": SamplingParams(temperature=1.0, top_p=0.8),
        "+ sequence bias -4 on end of turn": SamplingParams(temperature=1.0, top_p=0.8, sequence_bias=bias),
        "+ exponential decay (0, 1.01): the reference": SamplingParams(
            temperature=1.0, top_p=0.8, sequence_bias=bias, exponential_decay_length_penalty=(0, 1.01)),
    }


def end_of_turn_curves(length: int = 240) -> tuple[dict[str, list[float]], int]:
    """P(end of turn) at each reply length, for a fixed client reply scored by the embedded model.

    The reply is the client turns of the shipped sample conversations run together (long enough to
    show the decay; nothing is sampled, so the figure is the same on every machine). One forward
    pass gives the logits at every position; each setting's processors turn them into the
    probability the sampler would give the end-of-turn token there."""
    from eeyore.profile import load_profiles, render_system_prompt

    path = resolve_model_dir(None)
    tok = Tokenizer.from_pretrained(path)
    chat = ChatTemplate.for_tokenizer(tok)
    profile = load_profiles(None)[0]
    messages = [{"role": "system", "content": render_system_prompt(profile, "train")},
                {"role": "user", "content": "Hi, what brings you here today?"}]
    prompt = tok.encode(chat.render_prompt(messages))
    turns = [t for p in load_profiles(None) for t in p.client_turns()]
    reply = tok.encode(" ".join(turns))[:length]
    eot = tok.eos_ids[0]
    model = Llama.from_pretrained(path, torch.float32)
    with torch.no_grad():  # logits[k] predicts reply token k, after k reply tokens
        logits = model(torch.tensor([prompt + reply]))[0, len(prompt) - 1: len(prompt) - 1 + len(reply)].float()
    curves = {}
    for name, p in settings(eot).items():
        probs = []
        for k in range(len(reply)):
            x = logits[k: k + 1].clone()
            add_sequence_bias_(x, [bias_table(p.sequence_bias)], [prompt + reply[:k]])
            decay_length_penalty_(x, torch.tensor([eot]), torch.tensor([decay_boost(p, k)], dtype=torch.float32))
            vals, ids = truncate(x, torch.tensor([p.temperature]), torch.tensor([p.top_k]), torch.tensor([p.top_p]),
                                 torch.tensor([p.min_p]))
            probs.append(float(vals.softmax(-1)[ids == eot].sum()))
        curves[name] = probs
    return curves, eot


def plot_end_of_turn(path: Path) -> None:
    import matplotlib.pyplot as plt

    curves, eot = end_of_turn_curves()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, probs in curves.items():
        a.plot(range(len(probs)), probs, label=name, lw=1)
        alive, survive = 1.0, []
        for q in probs:
            survive.append(alive)
            alive *= 1 - q
        b.plot(range(len(survive)), survive, label=name)
    a.set_yscale("symlog", linthresh=1e-3)
    a.set_xlabel("reply tokens generated so far")
    a.set_ylabel(f"P(end of turn = token {eot})")
    a.set_title("Probability of ending the turn at each step", fontsize=10)
    b.set_xlabel("reply length (tokens)")
    b.set_ylabel("P(reply still going)")
    b.set_title("Chance a reply runs at least this long", fontsize=10)
    b.legend(fontsize=7)
    fig.suptitle("Embedded SmolLM2-135M-Instruct scoring one fixed client reply (the sample conversations' client "
                 "turns run together) after sample profile 0's system prompt", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(GUIDE / "figures"), help="where the PNGs go (default docs/guide/figures)")
    p.add_argument("--check", action="store_true", help="fail when a page's generated block differs (default: rewrite it)")
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_pretrained(resolve_model_dir(None))
    tokens = trained_tokens(tok)
    plot_loss_mask(tokens, out / "loss_mask.png")
    page = GUIDE / "chat-template-and-loss-mask.md"
    text = page.read_text()
    fresh = BLOCK.sub(lambda m: m.group(1) + diff_block(tokens) + m.group(3), text)
    if fresh != text:
        if a.check:
            print(f"{page.name}: the generated loss-mask block is stale: run python docs/guide/make_figures.py",
                  file=sys.stderr)
            return 1
        page.write_text(fresh)
    plot_rope(out / "rope_scaling.png")
    plot_end_of_turn(out / "eot_probability.png")
    plot_timeline(embedded_trace(), out / "timeline.png")
    print(f"figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
