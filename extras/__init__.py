"""Optional mechanisms beside the core (see docs/extras.md). Each imports only the core and other extras; the core
imports none of them (pipeline.py picks one when a run config names it; train.py and sample.py when a flag does).

    fp8.py               a frozen base stored in float8: Fp8Linear, the LoRA over it (Fp8LoRALinear), fp8 files
    fsdp.py              FSDP2 sharding for `torchrun ... train.py --fsdp`
    checkpoint_forms.py  every form of the FLUX checkpoint other than BFL's own file (checkpoint.load_flux_official)
    lora_formats.py      LoRA files in diffusers and kohya layouts; `python -m extras.lora_formats export RUN`
    schemes.py           the other semantic schemes of the ablation
    condition_cache.py   the condition cache (ConditionCache wraps a Flux)
"""
