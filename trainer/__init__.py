"""lorafleet trainer: fine-tune one adapter (LoRA, IA3, bottleneck, prefix or prompt tuning) on a frozen
base model and export it in the on-disk format the server serves (PEFT's, or ours for bottleneck).

Modules, one concept each: config (flags as a frozen dataclass), data (JSONL -> batches), bottleneck
(hooked adapter modules), methods (student model + one forward), distill (teacher + KD loss),
objective (loss sums + eval metrics), dist (torchrun/DDP plumbing), checkpoint (safetensors + JSON),
loop (the training loop), export (adapter files), cli (`python -m trainer`).
"""
