"""The only code that touches vLLM: one instrumentor per place (base: how)."""
