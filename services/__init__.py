"""modalign: cross-modal RLHF as production software (README.md)."""

import logging

# peft imports bitsandbytes (for --learner.lora-bits), which on CPUs with AVX512-BF16 tries at import to
# fetch an optional kernel from the Hugging Face hub; modalign never reaches the hub, the fallback is
# bitsandbytes' own kernel, and the warning would open every command's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
