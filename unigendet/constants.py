"""Constants several rooms share, each defined once here (torch-free)."""

DETECTION_PROMPT = "Does the image looks real/fake?"  # FakeClue's question, typo included: the models were taught it
FAKE_VERDICT = "This is a fake image."  # the first sentence of a FakeClue answer; what fresh fakes are taught
REAL_VERDICT = "This is a real image."

# dtype names the command line and the FSDP settings accept -> torch attribute names
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}

INCEPTION_WEIGHTS_ENV = "UNIGENDET_INCEPTION_WEIGHTS"  # a local torch-fidelity Inception file (no downloads)
