"""Model families: what differs between LlamaGen, Anole, Lumina-mGPT and the demo (prefix, CFG rows, decoding)."""
