"""Integrations with training frameworks (import the submodule you need: ``slimfit.integrations.hf``)."""
