"""HTTP serving: OpenAI and Ollama APIs over a continuous-batching speculative engine."""
