"""Drafter training: self-distillation data, the unrolled trainer, clustering, the CLI."""
