"""Publishing a trained adapter: the merge into a 16-bit base, the model card, the Hub, GGUF and llama.cpp."""
