"""Model implementations (one folder per family)."""
