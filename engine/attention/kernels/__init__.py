"""Device kernels for the attention backends (imported only by them, only when their device is used)."""
