"""Supervised fine-tuning: `torchrun --nproc_per_node=N -m eeyore.train.sft` (or plain `python -m`).

The reference's OpenRLHF command runs as is with only the launcher replaced. Records become
`tokens.Example`s (ids and labels, made as DPO makes its pairs: `tokens.py` holds the convention):

- chat records (`--apply_chat_template`): with `--multiturn` every assistant turn's content and
  end-of-turn token are targets; without it only the final assistant turn. Messages after the
  last assistant turn are dropped, records with no assistant turn are skipped (both counted).
  `--output_key` appends a response (a string is one assistant message) to the prompt messages.
- plain-text records: `input_key` is the prompt, `output_key` the response; the response tokens
  and an appended eos are targets.
- a sequence longer than `--max_len` keeps its first max_len tokens and its last one becomes eos
  (a target when it falls inside an assistant turn); records whose prompt (everything before the
  last trained turn) has >= max_len - 2 tokens are dropped and counted.

The loss of a micro-batch is the mean NLL over its targets (the labels shifted once, by
`tokens.collate`; fp32 log-softmax, computed in row slices by `loss.cross_entropy_sum`); the
step averages micro-batches and ranks, as OpenRLHF.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm import tqdm

from eeyore.model.chat import ChatTemplate, TemplateError
from eeyore.model.tokenizer import Tokenizer
from eeyore.model.fastpath import speed_up

from .config import TrainConfig, flag, recipe_default
from .data import DataError, Row, data_warnings
from .flags import parse_config, refuse
from .loss import cross_entropy_sum
from .packing import model_inputs
from .tokens import Batch, Example, Spans, chat_tokens, collate, collate_packed, text_tokens, trained_example
from .mixing import load_mixture
from .parallel import launch, load_sharded
from .trainer import Trainer, lora_spec, start_run


@dataclass
class SFTFormat:
    """How records are read: the data flags of the CLI."""

    input_key: str = "input"
    output_key: str | None = None
    apply_chat_template: bool = False
    multiturn: bool = False
    max_len: int = 2048
    input_template: str | None = None  # plain-text prompts go through it: "User: {}\nAssistant: "
    pretrain_mode: bool = False  # every token is a target


def _conversation(row: Row, fmt: SFTFormat) -> tuple[list[dict[str, str]], int]:
    """The messages of a chat record and how many of them form the prompt of `--output_key`."""
    prompt = row.chat(fmt.input_key, "user")
    if fmt.output_key is None:
        return prompt, 0
    return prompt + row.chat(fmt.output_key, "assistant"), len(prompt)


def _chat_tokens(row: Row, tok: Tokenizer, chat: ChatTemplate, fmt: SFTFormat) -> tuple[list[int], Spans] | None:
    """Ids and the spans to train (`tokens.chat_tokens`); None without an assistant turn to train."""
    messages, prompt_len = _conversation(row, fmt)
    # the first message whose assistant turns train: with --multiturn all of them; else only the
    # response: the turns after the prompt of --output_key, or the last turn
    first = prompt_len or max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
    if fmt.multiturn:
        first = 0
    try:
        ids, spans = chat_tokens(tok, chat, messages, first, tok.eos_ids[0])
    except TemplateError as exc:
        raise DataError(f"{row.where}: field {fmt.input_key!r}: {exc}") from None
    return (ids, spans) if spans else None


def _text_tokens(row: Row, tok: Tokenizer, fmt: SFTFormat) -> tuple[list[int], Spans] | None:
    """Ids and trained span of a plain-text record (`tokens.text_tokens`); None for an empty response."""
    if fmt.output_key is None and fmt.pretrain_mode:  # one text, all of it trained
        return text_tokens(tok, "", row.text(fmt.input_key), tok.eos_ids[0])
    if fmt.output_key is None:
        raise DataError(f"{row.where}: plain-text records need --output_key (or use --apply_chat_template for messages)")
    text = row.text(fmt.input_key)
    response = row.text(fmt.output_key)
    if not response.strip():
        return None
    return text_tokens(tok, fmt.input_template.format(text) if fmt.input_template else text, response, tok.eos_ids[0])


def make_example(row: Row, tok: Tokenizer, chat: ChatTemplate | None, fmt: SFTFormat) -> Example | str:
    """The example of one record, or why it is left out ("no_assistant" / "empty_response" / "too_long")."""
    made = _chat_tokens(row, tok, chat, fmt) if chat is not None else _text_tokens(row, tok, fmt)
    if made is None:
        return "no_assistant" if chat is not None else "empty_response"
    ids, spans = made
    if fmt.pretrain_mode:
        spans = [(0, spans[-1][1])]
    return trained_example(ids, spans, fmt.max_len, tok.eos_ids[0]) or "too_long"


def build_examples(rows: Sequence[Row], tok: Tokenizer, chat: ChatTemplate | None, fmt: SFTFormat, desc: str, show: bool = True) -> tuple[list[Example], Counter]:
    """Tokenize every row; the counter tells how many were dropped and why, and how many were cut."""
    examples, counts = [], Counter()
    for row in tqdm(rows, desc=f"tokenizing {desc}", unit="record", disable=not show):
        made = make_example(row, tok, chat, fmt)
        if isinstance(made, str):
            counts[made] += 1
        else:
            counts["truncated"] += made.truncated
            examples.append(made)
    return examples, counts


def sft_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean NLL over the micro-batch's target tokens; logits exist only one row slice at a time."""
    hidden = model.hidden_states(batch.input_ids, **model_inputs(batch.packed))
    total, count = cross_entropy_sum(hidden, model.lm_head.weight, batch.targets)
    return total / count.clamp(min=1), {}


class SFTRecipe:
    def __init__(self, pad_id: int, packing: bool = False) -> None:
        self.pad_id, self.packing = pad_id, packing

    def collate(self, examples: list[Example]) -> Batch:
        return collate_packed(examples) if self.packing else collate(examples, self.pad_id)

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return sft_loss(model, batch)


@dataclass
class SFTConfig(TrainConfig):
    """The SFT run: the shared flags with train_sft's defaults, and the record fields."""

    max_len: int = recipe_default("max_len", 2048)
    learning_rate: float = recipe_default("learning_rate", 5e-6)
    max_epochs: int = recipe_default("max_epochs", 2)
    ckpt_path: str = recipe_default("ckpt_path", "./ckpt/checkpoints_sft")
    wandb_project: str = recipe_default("wandb_project", "eeyore_train_sft")
    input_key: str = flag("input", "field holding the messages (chat) or the prompt text", "records")
    output_key: str | None = flag(None, "field holding the response (string or messages); chat records may leave it out", "records")
    multiturn: bool = flag(False, "train on every assistant turn of a conversation, not only the last (needs --apply_chat_template)", "records")

    def data_format(self) -> SFTFormat:
        return SFTFormat(self.input_key, self.output_key, self.apply_chat_template, self.multiturn, self.max_len, self.input_template, self.pretrain_mode)


def parse_args(argv: Sequence[str] | None = None) -> SFTConfig:
    prog = "python -m eeyore.train.sft"
    config = parse_config(
        SFTConfig, argv, prog,
        "Supervised fine-tuning on FSDP2 with every flag of OpenRLHF's train_sft. Launch with "
        "`torchrun --nproc_per_node=N -m eeyore.train.sft ...`, `deepspeed --module eeyore.train.sft ...` "
        "or plain `python -m eeyore.train.sft ...`.",
    )
    if config.multiturn and not config.apply_chat_template:
        refuse(prog, "--multiturn", "needs --apply_chat_template")
    return config


def _load(specs: str, split: str, probs: str | None, cfg: SFTConfig, tok: Tokenizer, chat: ChatTemplate | None, show: bool) -> list[Example]:
    rows = load_mixture(specs, probs, split, cfg.max_samples, cfg.seed)
    fmt = cfg.data_format()
    examples, counts = build_examples(rows, tok, chat, fmt, specs, show)
    if show:
        empty = f", {counts['empty_response']} with an empty response" if counts["empty_response"] else ""
        print(
            f"{specs} [{split}]: {len(examples)} examples from {len(rows)} records; dropped "
            f"{counts['too_long']} whose prompt has >= max_len-2 = {fmt.max_len - 2} tokens{empty} and "
            f"{counts['no_assistant']} without a non-empty assistant turn; cut to max_len: {counts['truncated']}"
        )
        for line in data_warnings(rows, specs):
            print(line)
    return examples


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    with launch(lambda: start_run(cfg)) as d:
        model = load_sharded(cfg.pretrain, d, cfg.zero_stage, cfg.bf16, cfg.gradient_checkpointing, lora=lora_spec(cfg), cpu_offload=cfg.adam_offload)
        speed_up(model, cfg.kernels, cfg.cpu_matmul)
        tok = Tokenizer.from_pretrained(model.name_or_path)
        chat = None
        if cfg.apply_chat_template:
            chat = ChatTemplate.for_tokenizer(tok, cfg.tokenizer_chat_template)
            tok.chat_template = chat.source  # the final checkpoint serves with the template it learnt
        train = _load(cfg.dataset, cfg.dataset_split, cfg.dataset_probs, cfg, tok, chat, d.is_main)
        evals = _load(cfg.eval_dataset, cfg.eval_split, None, cfg, tok, chat, d.is_main) if cfg.eval_dataset else None
        pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_ids[0]
        Trainer(cfg, d, model, tok, SFTRecipe(pad_id, cfg.packing_samples), train, evals).fit()


if __name__ == "__main__":
    main()
