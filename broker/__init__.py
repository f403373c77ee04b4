"""Agent secrets broker: task-scoped Vault credentials for AI agents."""

__version__ = "0.1.0"
