"""Qwen-VL (v1): Qwen/Qwen-VL and Qwen/Qwen-VL-Chat, computed the way the original remote code does,
without running any of it."""
