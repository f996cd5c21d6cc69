"""Training: SFT and DPO on one FSDP2 trainer core, launched with torchrun (or as one process).

How to read this package: `sft.py` and `dpo.py` are the two recipes (which fields and turns of a
record train, their loss, and `main`); `tokens.py` is the one convention both use for which
tokens are trained (ids + labels, shifted into targets once, by `collate`); `trainer.py` is the
loop they share; `config.py` and `flags.py` turn the command line (OpenRLHF's flags) into one
typed config; `parallel.py` sets up the process group and shards the model; `loss.py` and
`dpo_loss.py` compute the objectives without the full logits; `data.py` reads rows,
`packing.py` lays sequences end to end, `lora.py` adds adapters, `optim.py` holds AdamW and the
schedules, `checkpoint.py` resumes, `logs.py` writes the logs."""
