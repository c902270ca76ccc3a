"""Fine-tune any Hugging Face causal LM."""

import logging as _logging

# peft imports bitsandbytes whenever it is installed (the qlora extra), and bitsandbytes 0.50 on an AVX512-BF16
# CPU then tries to fetch an optional 4-bit GEMM kernel from the Hub ("kernels-community") and warns when it
# cannot. It falls back to its own kernel, which QLoRA on CPU uses anyway, and a run without a 4-bit base never
# calls either: the line says nothing about the run, so it is filtered (this one message only).
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage())
