"""HF model folder → GGUF: our streaming converter (`streaming`, with `vocab`) for the families in
`quantspace.archs` that name a GGUF spec, llama.cpp's own converter (`llama_cpp`) for every other architecture
it knows, and llama.cpp's per-tensor type choice predicted for size estimates (`tensor_types`)."""
