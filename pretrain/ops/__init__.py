"""The numerical core, pure functions of tensors: the ALiBi math (``alibi``), the attention kernels
(``attention/``) and the fused output-projection cross-entropy (``loss``). Nothing here knows of models,
ranks or files."""
