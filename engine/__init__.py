"""modeltest's bundled inference engine (vLLM-style API). The Qwen-VL model lands in its own issue;
for now this package holds the device layer the harness uses."""
