"""Qwen2-VL (and Qwen2.5-VL), being brought onto the engine (issue 17). Not registered yet: no
checkpoint loads through it. What is here is checked against transformers' own implementation:
rope.py (multimodal rotary positions), processor.py (dynamic-resolution image preprocessing),
vision.py (Qwen2-VL's vision tower; Qwen2.5-VL's window attention and RMSNorm/SwiGLU blocks are not
here yet), language.py (the language model over the paged cache: grouped-query attention, M-RoPE from
each request's positions, image features in place of their tokens)."""
