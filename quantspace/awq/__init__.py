"""AWQ (activation-aware weight quantization) in plain PyTorch: layout, per-architecture table, search, driver."""
